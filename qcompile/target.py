"""The Target contract, target-owned options, and the table of targets, imported lazily.

Everything the build and the evaluation call on a target is declared here, typed; nothing is probed
with `hasattr` and a target keeps no state between calls: what one bucket's compilation produces
flows to `emit` through its `CompiledBucket`, and what `emit` writes comes back as an `EmitResult`.

Each target lives in its own folder under `targets/` and may need an SDK (LiteRT, QNN, TensorRT).
The table maps names to import paths, so a missing SDK breaks only its own target, with one clear
message, never the CLI or the other targets. A target's options are declared in a light module of
its own (no SDK import): the CLI offers every target's options as one argument group each, as
Polygraphy's tools assemble their backends' argument groups, and refuses an option the chosen target
does not take.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.config import SamplerSettings, TargetName
from qcompile.errors import UserError
from qcompile.pass_manager import PassContext
from qcompile.quant import TensorRange

if TYPE_CHECKING:
    from qcompile.calibration.inputs import InputSet
    from qcompile.manifest import Manifest
    from qcompile.passes.insert_qdq import QuantPlan


class Runner(Protocol):
    """Runs an artifact as the model it was built from (numpy in, numpy out), picking each row's
    timestep bucket. `qcompile.runtime.BucketRunner` implements the bucket routing."""

    input_names: tuple[str, ...]
    buckets: int

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray: ...

    def bucket_of(self, timestep: float) -> int: ...

    def rows_of(self, bucket: int, count: int, timesteps: np.ndarray | None) -> np.ndarray: ...

    def release(self) -> None:
        """Let go of loaded sessions/interpreters; the next run loads them again."""


# --- compile side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketJob:
    """What the build asks of a target for one timestep bucket."""

    index: int
    plan: QuantPlan  # which tensors and weights to quantize (from the float graph and the target's caps)
    ranges: Mapping[str, TensorRange]  # this bucket's calibrated activation ranges
    timestep_input: str | None  # the diffusion timestep input (None for models without one)


@dataclass(frozen=True, eq=False)
class CompiledBucket:
    """One bucket's products. `graph` is the Q/DQ ONNX graph the target's files are made from; the
    optional graphs are what some targets keep beside it."""

    index: int
    graph: gs.Graph
    # The float pre-processing a runner computes on the host before the device graph (QNN: the
    # timestep embedding); its outputs are `graph`'s inputs of the same names.
    host_graph: gs.Graph | None = None
    # The device graph just before Q/DQ insertion, for SDK toolchains that quantize from encodings.
    float_graph: gs.Graph | None = None


class EmitPurpose(enum.Enum):
    ARTIFACT = "artifact"  # every file: the runtime's, the SDK toolchains', the device's
    PROBE = "probe"  # only what the runner reads: a throwaway build measured on the runtime (mixed precision)


@dataclass(frozen=True)
class EmitResult:
    """What `emit` wrote, relative to its folder."""

    bucket_files: tuple[tuple[str, ...], ...]  # per bucket, the runtime's files, model file first
    sdk_files: tuple[str, ...] = ()  # for other toolchains or validation; not read by the runner
    device: Mapping[str, Any] = field(default_factory=dict)  # what device files were made for


# --- artifact side ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DeviceEvidence:
    """What a device check may use: held-out inputs covering every bucket, the float model's runner,
    the evaluation's runner of the artifact, and the sampler for checks that sample."""

    adapter: Any
    held_out: InputSet
    reference: Runner
    artifact_runner: Runner
    sampler: SamplerSettings
    samples: int  # images a device check may sample (each costs many device calls)


@dataclass(frozen=True)
class DeviceReport:
    """A device check's findings: `checks` decide the build, `summary` joins the report's summary."""

    device: str  # what ran, in words
    buckets: tuple[Mapping[str, Any], ...]
    summary: Mapping[str, Any]
    checks: Mapping[str, bool]
    details: Mapping[str, Any] = field(default_factory=dict)  # target-specific sections

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "buckets": [dict(b) for b in self.buckets], "summary": dict(self.summary),
                "checks": dict(self.checks), **self.details}


class TargetOptions(Protocol):
    """A target's own options: a frozen dataclass with the CLI declaration of its fields."""

    @classmethod
    def cli(cls) -> tuple[OptionSpec, ...]: ...

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> TargetOptions: ...


@dataclass(frozen=True)
class OptionSpec:
    """One command-line option of a target: `--flag VALUE` sets the options field `field`."""

    field: str
    flag: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    repeatable: bool = False  # given several times, the field gets a tuple


def integer(text: str) -> int:
    """An option's integer value (its range is checked by the options class, which names the option)."""
    try:
        return int(text)
    except ValueError:
        raise UserError(f"expected an integer, got {text!r}") from None


# Options more than one target takes are declared once, so one flag means one thing everywhere.
STATIC_BATCH = OptionSpec("batch", "--static-batch", integer, "N",
                          "batch a static-shape target is built for (tflite-*: default 1; qnn-*: default 2, one "
                          "classifier-free-guidance step); the runner runs other batches in chunks of it")


@dataclass(frozen=True)
class NoOptions:
    """For targets that take no options of their own."""

    @classmethod
    def cli(cls) -> tuple[OptionSpec, ...]:
        return ()

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> NoOptions:
        return cls()


class Target(Protocol):
    name: TargetName
    caps: TargetCaps
    runtime_name: str
    options: TargetOptions

    def runtime_version(self) -> str: ...

    # The batch the files are built for when `caps.static_shapes`; None for targets with dynamic shapes.
    @property
    def static_batch(self) -> int | None: ...

    def compile_bucket(self, graph: gs.Graph, job: BucketJob, ctx: PassContext) -> CompiledBucket:
        """Turn `graph` (a copy of the canonical float graph, rewritten in place) into this target's
        Q/DQ graph for one bucket, by an explicit list of passes."""

    def emit(self, buckets: Sequence[CompiledBucket], out_dir: Path,
             purpose: EmitPurpose = EmitPurpose.ARTIFACT) -> EmitResult:
        """Write the target's files for every bucket (weights shared between buckets)."""

    def runner(self, folder: Path, manifest: Manifest) -> Runner:
        """The artifact in `folder` on this target's runtime, as the model it was built from."""

    def device_checks(self, folder: Path, manifest: Manifest, evidence: DeviceEvidence) -> DeviceReport | None:
        """Checks on the device (or its simulator) beyond the evaluation's; None for targets whose
        runtime the evaluation already is."""


# --- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetEntry:
    target: str  # "module:Class", imported on use (it may need an SDK)
    options: str  # "module:Class" of its options: a light module, no SDK import


TARGETS: dict[TargetName, TargetEntry] = {
    TargetName.ORT_INT8: TargetEntry("qcompile.targets.ort_int8.target:OrtInt8Target",
                                     "qcompile.target:NoOptions"),
    TargetName.TFLITE_INT8: TargetEntry("qcompile.targets.tflite.target:TfliteInt8Target",
                                        "qcompile.targets.tflite.options:TfliteOptions"),
    TargetName.TFLITE_FP32: TargetEntry("qcompile.targets.tflite.target:TfliteFp32Target",
                                        "qcompile.targets.tflite.options:TfliteOptions"),
    TargetName.QNN_W8A8: TargetEntry("qcompile.targets.qnn.target:QnnW8A8Target",
                                     "qcompile.targets.qnn.options:QnnOptions"),
    TargetName.QNN_W8A16: TargetEntry("qcompile.targets.qnn.target:QnnW8A16Target",
                                      "qcompile.targets.qnn.options:QnnOptions"),
    TargetName.TRT_INT8: TargetEntry("qcompile.targets.tensorrt.target:TrtInt8Target",
                                     "qcompile.targets.tensorrt.options:TrtOptions"),
    TargetName.TRT_FP8: TargetEntry("qcompile.targets.tensorrt.target:TrtFp8Target",
                                    "qcompile.targets.tensorrt.options:TrtOptions"),
}


def _import(spec: str):
    module_name, attr = spec.split(":")
    return getattr(importlib.import_module(module_name), attr)


def entry(name: TargetName) -> TargetEntry:
    found = TARGETS.get(name)
    if found is None:
        ready = ", ".join(t.value for t in TARGETS)
        raise UserError(f"--target {name.value}: not available in this version; available: {ready}")
    return found


def options_class(name: TargetName) -> type:
    return _import(entry(name).options)


def default_options(name: TargetName) -> TargetOptions:
    return options_class(name)()


def load_target(name: TargetName, options: TargetOptions | None = None) -> Target:
    """The target's object with its options (None: the target's defaults)."""
    cls = _import(entry(name).target)
    opts = options if options is not None else default_options(name)
    if not isinstance(opts, options_class(name)):
        raise UserError(f"--target {name.value}: takes {options_class(name).__name__}, got {type(opts).__name__}")
    return cls(opts)


def cli_options() -> dict[str, tuple[OptionSpec, list[TargetName]]]:
    """Every target option by flag, with the targets that take it (one flag means one thing)."""
    out: dict[str, tuple[OptionSpec, list[TargetName]]] = {}
    for name in TARGETS:
        for spec in options_class(name).cli():
            known = out.get(spec.flag)
            if known is not None and known[0] != spec:
                raise RuntimeError(f"option {spec.flag} is declared differently by two targets")
            out.setdefault(spec.flag, (spec, []))[1].append(name)
    return out


def options_from_cli(name: TargetName, given: Mapping[str, Any]) -> TargetOptions:
    """The chosen target's options from the command line's values by flag (None: not given); an option
    the target does not take is refused in one line naming the targets that do."""
    takes = {s.flag: s for s in options_class(name).cli()}
    table = cli_options()
    for flag, value in given.items():
        if value is not None and flag not in takes:
            who = ", ".join(t.value for t in table[flag][1])
            raise UserError(f"{flag}: target {name.value} does not take it; the option is for {who}")
    return options_class(name).from_cli({takes[f].field: v for f, v in given.items() if f in takes and v is not None})
