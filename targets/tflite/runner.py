"""Run a .tflite artifact in the LiteRT interpreter as the ONNX model it was built from.

The API matches OnnxRunner (`input_names`, `run(inputs) -> first output`, `bucket_of`, `__call__`),
so the same evaluation code drives both. Inside, tensors are stored in the layouts the lowering chose
(NHWC for images) with a static batch: the runner transposes at the boundary and runs a larger
batch in chunks of the model's batch, padding the last chunk by repeating its final sample.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qcompile.errors import UserError
from qcompile.runtime import BucketRunner, static_chunks
from qcompile.targets.tflite import deps
from qcompile.targets.tflite.emit import METADATA_KEY
from qcompile.targets.tflite.layout import invert

THREADS = 2


def read_metadata(data: bytes) -> dict:
    S = deps.schema()
    model = S.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name() is not None and md.Name().decode() == METADATA_KEY:
            buf = model.Buffers(md.Buffer())
            if buf.Offset() > 1:
                return json.loads(data[buf.Offset():buf.Offset() + buf.Size()])
            return json.loads(buf.DataAsNumpy().tobytes())
    raise UserError(f"tflite: the model has no '{METADATA_KEY}' metadata (not written by qcompile)")


class _Program:
    """One signature of one interpreter: a timestep bucket. Inputs and outputs are named as in the ONNX
    model; `key`, when the metadata gives one, is the name at the signature (a peer's `args_0`), and
    `quant` the [scale, zero point] of an integer input or output."""

    def __init__(self, interpreter, key: str, info: dict, batch: int):
        self.runner = interpreter.get_signature_runner(key)
        self.inputs = info["inputs"]
        self.outputs = info["outputs"]
        self.batch = batch

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {spec["name"]: np.asarray(feed[spec["name"]]) for spec in self.inputs}
        batched = {spec["name"] for spec in self.inputs if self._batched(spec)}
        out_spec = self.outputs[0]
        parts = []
        for chunk, count in static_chunks(inputs, self.batch, batched):
            args = {spec.get("key", spec["name"]): np.ascontiguousarray(
                np.transpose(_to_stored(chunk[spec["name"]], spec), spec["perm"])) for spec in self.inputs}
            out = _from_stored(self.runner(**args)[out_spec.get("key", out_spec["name"])], out_spec)
            parts.append(np.transpose(out, invert(out_spec["perm"]))[:count])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _batched(self, spec: dict) -> bool:
        return bool(spec["shape"]) and spec["shape"][0] == self.batch


def _bucket_order(item: tuple[str, dict]) -> tuple[int, str]:
    """Signatures in bucket order: by subgraph index (JSON keys come back sorted, and 'bucket_10'
    sorts before 'bucket_2'); files without it by the number in the key."""
    key, info = item
    if "subgraph" in info:
        return int(info["subgraph"]), key
    digits = "".join(ch for ch in key if ch.isdigit())
    return (int(digits) if digits else 0), key


def _to_stored(x: np.ndarray, spec: dict) -> np.ndarray:
    """A float input as the model takes it: quantized when its metadata gives `quant` [scale, zero point]
    (models with integer inputs, as ai-edge-quantizer writes them), else cast."""
    if "quant" not in spec:
        return x.astype(spec["dtype"], copy=False)
    scale, zero_point = spec["quant"]
    info = np.iinfo(spec["dtype"])
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(spec["dtype"])


def _from_stored(y: np.ndarray, spec: dict) -> np.ndarray:
    if "quant" not in spec:
        return y
    scale, zero_point = spec["quant"]
    return ((y.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


class TfliteRunner(BucketRunner):
    """One program per timestep bucket: the signatures of the given files, in order.

    `bucket_edges` are the K-1 inner timestep boundaries (ascending), as in OnnxRunner.

    A file's interpreter is opened on the first run of one of its buckets, from the file (mapped, not
    read into memory), and `release` closes it: the evaluation runs the float model before the
    artifact, and the device check its own interpreter, without this one open beside them (for SD
    1.5's int8 UNet, 0.87 GB of weights mapped and as much again packed by XNNPACK).
    """

    def __init__(self, paths: Sequence[Path], *, bucket_edges: Sequence[float] = (),
                 timestep_name: str | None = None, sample_name: str | None = None, threads: int = THREADS):
        self.paths = tuple(Path(p) for p in paths)
        self.threads = threads
        self.signatures: list[tuple[int, str, dict, int]] = []  # (file, signature key, its metadata, batch)
        for i, path in enumerate(self.paths):
            meta = file_metadata(path)
            self.signatures += [(i, key, info, int(meta["batch"]))
                                for key, info in sorted(meta["signatures"].items(), key=_bucket_order)]
        self.programs: list[_Program | None] = [None] * len(self.signatures)
        super().__init__(len(self.signatures), bucket_edges=bucket_edges, timestep_name=timestep_name,
                         sample_name=sample_name)
        first = self.signatures[0][2]
        self.input_names = tuple(i["name"] for i in first["inputs"])
        self.output_names = tuple(o["name"] for o in first["outputs"])

    @property
    def loaded(self) -> bool:
        """Whether an interpreter is open."""
        return any(p is not None for p in self.programs)

    def program(self, bucket: int) -> _Program:
        if self.programs[bucket] is None:
            file = self.signatures[bucket][0]
            interpreter = deps.interpreter_module().Interpreter(model_path=str(self.paths[file]),
                                                                num_threads=self.threads)
            for k, (i, key, info, batch) in enumerate(self.signatures):  # every bucket of the file
                if i == file:
                    self.programs[k] = _Program(interpreter, key, info, batch)
        return self.programs[bucket]

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        """NCHW in and out."""
        return self.program(bucket).run(feed)

    def release(self) -> None:
        self.programs = [None] * len(self.signatures)


def file_metadata(path: Path) -> dict:
    """`read_metadata` of a file, read through a mapping (the weights are not read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return read_metadata(data)
