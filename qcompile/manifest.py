"""manifest.json, typed: the one module that writes and reads an artifact's manifest (README, DESIGN §4).

Users' scripts read the JSON; qcompile reads it back only through `Manifest.read`, which also decides
what counts as a qcompile artifact folder: a `manifest.json` that parses into this structure, not any
file of that name. The JSON keys are the documented contract; the dataclasses mirror them one to one
(`class` is spelled `class_name` here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qcompile.atomic import write_json
from qcompile.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
FP32_TARGET = "fp32-onnx"  # what `qcompile export` writes: the canonical float model alone


@dataclass(frozen=True)
class SourceRecord:
    model: str  # the MODEL argument: folder, pipeline folder or builtin:<name>
    component: str | None
    seed: int
    family: str
    class_name: str  # the diffusers (or transformers) class
    fp32_model: str  # the canonical float model, relative to the artifact folder
    fingerprint: str | None = None  # sha256 of the canonical float model's files
    # The component's own config (diffusers' config.json), relative to the artifact folder: what
    # `qcompile.load` reports as `.config` when the artifact stands in for the component in a pipeline.
    model_config: str | None = None


@dataclass(frozen=True)
class InputRecord:
    name: str
    shape: tuple[int, ...]  # a batch-1 example at the adapter's defaults
    dtype: str
    role: str
    # Per axis: a JSON-able description of what the exported graph accepts (dynamic or fixed, multiple,
    # limits); empty for artifacts whose adapter does not describe its axes.
    axes: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ModelRecord:
    inputs: tuple[InputRecord, ...]
    outputs: tuple[str, ...]
    sample_input: str | None
    timestep_input: str | None
    timestep_scale: float


@dataclass(frozen=True)
class ExportRecord:
    exporter: str
    opset: int
    max_abs_diff_vs_torch: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CalibrationRecord:
    spec: str  # what the statistics were really computed from (the cache's own source when reused)
    rows: int
    calls: int
    estimator: str
    bucket_method: str
    cache_fingerprint: str
    recording_fingerprint: str
    timesteps: tuple[float, ...] | None
    # `--buckets` as asked; `buckets` below holds as many as were built (fewer for a model without a
    # timestep, or with fewer distinct calibrated timesteps than asked).
    buckets_requested: int = 1


@dataclass(frozen=True)
class QuantizationRecord:
    weights: str
    activations: str
    outputs: str
    quantized_activations: int  # activations that really got a Q/DQ pair
    quantized_weights: int
    float_layers: tuple[str, ...]
    exclusion_patterns: tuple[str, ...]
    full_integer: bool
    split_shortcut: bool
    smoothquant: Mapping[str, Any] | None = None
    mixed_precision: Mapping[str, Any] | None = None
    # Layers computed with a wider activation type than `activations` (integer-only targets' mixed
    # precision: A16W8 on an 8-bit NPU), by node name.
    wide_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BucketRecord:
    index: int
    timestep_range: tuple[float, float]  # [lo, hi): the runner's selection rule
    calibration_timesteps: tuple[float, ...]
    files: tuple[str, ...]  # the runtime's files for this bucket, model file first
    # What the bucket's graph computes wide (16-bit activations on an 8-bit NPU, float elsewhere) and the
    # cost: fractions of activation bytes and of MACs; with per-bucket mixed precision, its layers and
    # probe measurements.
    precision: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    target: str
    precision: str
    qcompile_version: str
    source: SourceRecord
    model: ModelRecord
    export: ExportRecord
    calibration: CalibrationRecord | None = None
    quantization: QuantizationRecord | None = None
    buckets: tuple[BucketRecord, ...] = ()
    # Files a target writes for other toolchains or for validation, not read by its runner.
    sdk_files: tuple[str, ...] = ()
    # What the device files were made for (QNN: the HTP architecture of the context binaries).
    device: Mapping[str, Any] = field(default_factory=dict)
    pass_log: tuple[Mapping[str, Any], ...] = ()
    tools: Mapping[str, str] = field(default_factory=dict)
    # Static-shape artifacts (tflite-*, qnn-*): the one shape each input is built for, batch included.
    # Empty for dynamic artifacts: `model.inputs[].axes` says what they accept.
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    # --- what runners read ----------------------------------------------------------------------
    @property
    def bucket_edges(self) -> list[float]:
        """The K-1 inner timestep boundaries, ascending (BucketRunner's selection rule)."""
        return [b.timestep_range[0] for b in self.buckets[1:]]

    def bucket_files(self, folder: Path) -> list[Path]:
        """Each bucket's model file (the first of its files)."""
        return [Path(folder) / b.files[0] for b in self.buckets]

    def fp32_path(self, folder: Path) -> Path:
        return Path(folder) / self.source.fp32_model

    def runtime_files(self) -> list[str]:
        """Every file the runner reads, once each."""
        return sorted({f for b in self.buckets for f in b.files})

    # --- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "qcompile_version": self.qcompile_version,
            "target": self.target,
            "precision": self.precision,
            "source": _source_json(self.source),
            "model": {"inputs": [_plain(i) for i in self.model.inputs], "outputs": list(self.model.outputs),
                      "sample_input": self.model.sample_input, "timestep_input": self.model.timestep_input,
                      "timestep_scale": self.model.timestep_scale},
            "export": _plain(self.export),
            "calibration": None if self.calibration is None else _plain(self.calibration),
            "quantization": None if self.quantization is None else _plain(self.quantization),
            "buckets": [_plain(b) for b in self.buckets],
            "sdk_files": list(self.sdk_files),
            "device": dict(self.device),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "pass_log": [dict(e) for e in self.pass_log],
            "tools": dict(self.tools),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        m = dict(data)
        model = dict(m["model"])
        return cls(
            format=int(m["format"]), qcompile_version=str(m["qcompile_version"]), target=str(m["target"]),
            precision=str(m["precision"]),
            source=_build(SourceRecord, {**m["source"], "class_name": m["source"]["class"]}),
            model=ModelRecord(inputs=tuple(_build(InputRecord, i) for i in model["inputs"]),
                              outputs=tuple(model["outputs"]), sample_input=model["sample_input"],
                              timestep_input=model["timestep_input"], timestep_scale=float(model["timestep_scale"])),
            export=_build(ExportRecord, m["export"]),
            calibration=None if m.get("calibration") is None else _build(CalibrationRecord, m["calibration"]),
            quantization=None if m.get("quantization") is None else _build(QuantizationRecord, m["quantization"]),
            buckets=tuple(_build(BucketRecord, b) for b in m.get("buckets", ())),
            sdk_files=tuple(m.get("sdk_files", ())), device=dict(m.get("device") or {}),
            pass_log=tuple(m.get("pass_log", ())), tools=dict(m.get("tools", {})),
            input_shapes={str(k): tuple(int(d) for d in v) for k, v in (m.get("input_shapes") or {}).items()},
        )

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        write_json(path, self.to_json())
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of an artifact (or export) folder; one-line UserError when it is not one."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder}: not a qcompile artifact folder (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not is_manifest_json(data):
            raise UserError(f"{path}: not a qcompile manifest (no format {MANIFEST_FORMAT} / qcompile_version)")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a qcompile manifest ({type(exc).__name__}: {exc})") from None


def is_manifest_json(data: Any) -> bool:
    """Whether parsed JSON is a qcompile manifest by its own markers (not merely a file of that name)."""
    return (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
            and isinstance(data.get("qcompile_version"), str) and isinstance(data.get("target"), str)
            and isinstance(data.get("source"), dict))


def is_artifact_folder(folder: Path) -> bool:
    """A folder qcompile wrote: its manifest.json parses as a qcompile manifest."""
    path = Path(folder) / MANIFEST
    try:
        return is_manifest_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def _plain(record: Any) -> dict[str, Any]:
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, tuple):
            value = [dict(v) if isinstance(v, Mapping) else v for v in value]
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def _source_json(source: SourceRecord) -> dict[str, Any]:
    out = _plain(source)
    out["class"] = out.pop("class_name")
    return out


def _build(cls: type, data: Mapping[str, Any]):
    """A record from its JSON object: known keys only, lists to tuples (records are frozen)."""
    names = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**values)
