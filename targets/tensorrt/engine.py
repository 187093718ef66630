"""The TensorRT engine: optimization profiles from the adapter's axes record, and the builder, through
Polygraphy's loaders, behind one check.

Everything up to the call into TensorRT (the profiles, the sidecar's content) is computed and
written on every machine; the engine itself only where `tensorrt` imports and a GPU answers
(`unavailable()` says why not, in one line). The network is strongly typed (precision comes from the
Q/DQ nodes alone: no INT8/FP8/FP16 builder flags, which TensorRT 11 removed), parsed by Polygraphy's
`NetworkFromOnnxPath(strongly_typed=True)`, configured by `CreateConfig(profiles=...,
load_timing_cache=..., builder_optimization_level=...)` and built by `EngineFromNetwork(...,
save_timing_cache=...)`, so the timing cache is read and written back.

Not verified on this project's machines (no GPU, TensorRT does not install): `build_engine` and the
engine runner; `tools/trt_gpu_check.py` is what a GPU user runs to check them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qcompile.atomic import write_json
from qcompile.manifest import InputRecord

# The profile's optimum batch: one classifier-free-guidance pair.
OPT_BATCH = 2


def unavailable() -> str | None:
    """Why no engine can be built here (one line), or None when TensorRT and a GPU are both present."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT not installed"
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "polygraphy not installed (pip install 'qcompile[trt]')"
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except AttributeError:  # tensorrt-lean / -dispatch: a runtime without the builder
        return f"TensorRT {trt.__version__} has no builder (a lean or dispatch runtime)"
    except Exception as err:  # TensorRT raises a plain error when CUDA finds no device
        first = str(err).splitlines()[0] if str(err) else "no device"
        return f"TensorRT {trt.__version__} found no usable GPU ({first})"
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def axis_range(axis: Mapping[str, Any], max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) of one axis of the adapter's record: fixed axes are their default; the batch runs
    1..max_batch around one CFG pair; other dynamic axes run from their minimum to their maximum (twice
    the default when the architecture sets no limit), on their multiple."""
    default = int(axis["default"])
    if not axis.get("dynamic"):
        return default, default, default
    multiple = int(axis.get("multiple") or 1)
    low = _round_up(max(int(axis.get("min") or 1), 1), multiple)
    if axis.get("name") == "batch":
        high = max(max_batch, low)
        return low, min(max(OPT_BATCH, low), high), high
    limit = axis.get("max")
    high = int(limit) if limit is not None else 2 * default
    high = max(low, high - high % multiple)
    return low, min(max(default, low), high), high


def profiles(inputs: Sequence[InputRecord], max_batch: int, extra: Mapping[str, Sequence[int]] = ()
             ) -> dict[str, dict[str, list[int]]]:
    """One optimization profile: per input, min/opt/max shapes from the axes record. An input without a
    record (older artifacts) gets its example shape with axis 0 as the batch, which qcompile's export
    always leaves dynamic."""
    out: dict[str, dict[str, list[int]]] = {}
    batch = {"name": "batch", "dynamic": True, "default": 1, "multiple": 1, "min": 1, "max": max_batch}
    for record in inputs:
        axes = record.axes or [batch, *({"name": str(i), "default": d} for i, d in enumerate(record.shape[1:], 1))]
        ranges = [axis_range(a, max_batch) for a in axes]
        out[record.name] = {key: [r[i] for r in ranges] for i, key in enumerate(("min", "opt", "max"))}
    for name, shape in dict(extra).items():
        out[name] = {key: list(shape) for key in ("min", "opt", "max")}
    return out


def build_engine(onnx_path: Path, engine_path: Path, shapes: Mapping[str, Mapping[str, Sequence[int]]], *,
                 opt_level: int, timing_cache: Path | None, sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Build and save the engine with Polygraphy, and its JSON sidecar beside it; returns the sidecar.
    Only call where `unavailable()` is None."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile()
    for name, s in shapes.items():
        profile.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
    cache = str(timing_cache) if timing_cache is not None else None
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=[profile], builder_optimization_level=opt_level,
                          load_timing_cache=cache if cache and Path(cache).is_file() else None)
    SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=cache), str(engine_path))()
    record = {**sidecar, "tensorrt": trt.__version__, "gpu": gpu_name(), "engine": engine_path.name,
              "timing_cache": cache, "builder_optimization_level": opt_level}
    write_json(engine_path.with_name(engine_path.name + ".json"), record)
    return record


def gpu_name() -> str:
    try:
        from cuda import cudart  # cuda-python, when present
        _, props = cudart.cudaGetDeviceProperties(0)
        return props.name.decode()
    except Exception:  # not essential: the sidecar says unknown
        return "unknown"


class EngineRunner:
    """Runs a built engine with Polygraphy's TrtRunner (numpy in, numpy out); one bucket input when
    the engine serves every timestep bucket. GPU only."""

    def __init__(self, engine_path: Path):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()
        meta = json.loads(Path(str(engine_path) + ".json").read_text())
        self.output = meta["outputs"][0]

    def run(self, feed: Mapping[str, Any]) -> Any:
        return self.runner.infer(dict(feed))[self.output]

    def close(self) -> None:
        self.runner.deactivate()
