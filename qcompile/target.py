"""The Target contract and the table of targets, imported lazily.

Each target lives in its own folder under `targets/` and may need an SDK (LiteRT, QNN, TensorRT).
The table maps names to import paths, so a missing SDK breaks only its own target, with one clear
message, never the CLI or the other targets.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.config import TargetName
from qcompile.errors import UserError
from qcompile.pass_manager import Pass
from qcompile.quant import TensorRange


class Runner(Protocol):
    input_names: tuple[str, ...]

    def run(self, inputs: dict[str, Any]) -> Any: ...


class Target(Protocol):
    name: TargetName
    caps: TargetCaps
    runtime_name: str

    def runtime_version(self) -> str: ...

    def pipeline(self, plan: Any, ranges: Mapping[str, TensorRange], *,
                 timestep_input: str | None = None) -> list[Pass]:
        """Passes that turn the canonical float graph into this target's quantized graph
        (`timestep_input` names the diffusion timestep input, for targets that treat it specially)."""

    def emit(self, graphs: Sequence[gs.Graph], out_dir: Path) -> list[list[str]]:
        """Write the target's files for the buckets' graphs (one per bucket, weights shared);
        return each bucket's file names, relative to `out_dir`, the model file first."""

    def runner(self, artifact_dir: Path, manifest: Mapping[str, Any]) -> Runner: ...


TARGETS: dict[TargetName, str] = {
    TargetName.ORT_INT8: "qcompile.targets.ort_int8.target:OrtInt8Target",
    TargetName.TFLITE_INT8: "qcompile.targets.tflite.target:TfliteInt8Target",
    TargetName.TFLITE_FP32: "qcompile.targets.tflite.target:TfliteFp32Target",
    TargetName.QNN_W8A8: "qcompile.targets.qnn.target:QnnW8A8Target",
    TargetName.QNN_W8A16: "qcompile.targets.qnn.target:QnnW8A16Target",
}


# Target options: (constructor parameter, command-line option, which targets take it).
TARGET_OPTIONS = (("batch", "--static-batch", "static-shape targets (tflite-*, qnn-*)"),
                  ("htp_arch", "--htp-arch", "the qnn-* targets"))


def load_target(name: TargetName, *, static_batch: int | None = None, htp_arch: int | None = None) -> Target:
    """The target's object; `static_batch` sets the batch of a target built with static shapes,
    `htp_arch` the HTP architecture of a QNN target."""
    spec = TARGETS.get(name)
    if spec is None:
        ready = ", ".join(t.value for t in TARGETS)
        raise UserError(f"--target {name.value}: not available in this version; available: {ready}")
    module_name, cls_name = spec.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    given = {"batch": static_batch, "htp_arch": htp_arch}
    accepted = inspect.signature(cls).parameters
    for param, option, who in TARGET_OPTIONS:
        if given[param] is not None and param not in accepted:
            raise UserError(f"{option}: target {name.value} does not take it; the option is for {who}")
    return cls(**{k: v for k, v in given.items() if v is not None})
