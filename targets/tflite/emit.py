"""Write a `ModelBuilder` as a TFLite flatbuffer with the schema's object API (no TensorFlow).

Flatbuffers address everything with 32-bit offsets, so one flatbuffer cannot pass 2 GiB. Constant data
normally lives inside it (each buffer aligned to 16 bytes for the kernels); when the weights would
not fit, they are written after the flatbuffer and each buffer records its `offset` and `size` in
the file instead, which the LiteRT loader supports. Only a flatbuffer that is too large even
without its weights (impossible in practice) stops the build, with a UserError naming the limit.

Tables, vectors and strings are written once per distinct content and referenced wherever they recur
(a flatbuffer is a DAG of offsets, so this is valid for every reader). Timestep buckets differ only in
activation scales and bias values; with sharing, a bucket's subgraph costs its tensor and operator
vectors plus the tensors whose parameters differ, not a copy of every table.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from qcompile.atomic import atomic_path
from qcompile.errors import UserError
from qcompile.targets.tflite import deps
from qcompile.targets.tflite.builder import ModelBuilder, Subgraph
from qcompile.targets.tflite.versions import op_version

FLATBUFFER_LIMIT = 2**31 - 1  # bytes: the largest flatbuffer 32-bit offsets can address
# Room left for the model's own tables when deciding whether weights fit inside the flatbuffer.
TABLE_MARGIN = 64 << 20
BUFFER_ALIGN = 16
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
METADATA_KEY = "qcompile"
# BuiltinOperator codes from here on are written as PLACEHOLDER_FOR_GREATER_OP_CODES (127) in the
# deprecated one-byte field, the real code in `builtin_code`.
_DEPRECATED_CODE_LIMIT = 127

_NP_TO_TFL = {
    np.dtype(np.float32): "FLOAT32", np.dtype(np.float16): "FLOAT16", np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8", np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL",
    np.dtype(np.int16): "INT16", np.dtype(np.int8): "INT8", np.dtype(np.float64): "FLOAT64",
}


def tflite_type(dtype: np.dtype) -> str:
    name = _NP_TO_TFL.get(np.dtype(dtype))
    if name is None:
        raise UserError(f"tflite: tensors of type {np.dtype(dtype)} have no TFLite equivalent")
    return name


def serialize(model: ModelBuilder, *, external_data: bool | None = None) -> bytes:
    """The .tflite file's bytes. `external_data` forces (True) or forbids (False) weights after the
    flatbuffer; by default they go there only when they would not fit inside it."""
    return b"".join(_pieces(model, external_data))


def write_tflite(model: ModelBuilder, path: Path, *, external_data: bool | None = None) -> Path:
    """Write the file `serialize` describes, piece by piece: with the weights after the flatbuffer
    (a model past 2 GiB, e.g. SD 1.5's UNet in fp32, 3.4 GB) the file is never held in memory whole,
    where joining it first cost two more copies of the weights at the build's peak."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in _pieces(model, external_data):
            f.write(piece)
    return path


def _pieces(model: ModelBuilder, external_data: bool | None):
    """The file in order: the flatbuffer, then (external data) each buffer after its zero padding."""
    fits = model.data_bytes <= FLATBUFFER_LIMIT - TABLE_MARGIN
    if external_data is None:
        external_data = not fits
    if not external_data:
        if not fits:
            raise UserError(f"tflite: {model.data_bytes} bytes of weights do not fit under the flatbuffer limit "
                            f"of {FLATBUFFER_LIMIT} bytes (2 GiB); write them after it (external data)")
        yield _finish(_model_t(model, inline=True), model.data_bytes)
        return
    # Pack once with placeholder offsets (non-zero, so the packed size does not change), then again.
    placeholder = [(2, b.size) for b in model.buffers]
    head = _finish(_model_t(model, inline=False, offsets=placeholder))
    offsets, pos = [], _round_up(len(head), BUFFER_ALIGN)
    for b in model.buffers:
        offsets.append((pos if b.size else 0, b.size))
        pos = _round_up(pos + b.size, BUFFER_ALIGN)
    head = _finish(_model_t(model, inline=False, offsets=offsets))
    yield head
    written = len(head)
    for b, (off, size) in zip(model.buffers, offsets, strict=True):
        if size:
            yield bytes(off - written)
            yield memoryview(np.ascontiguousarray(b)).cast("B")  # the buffer's own bytes, not a copy
            written = off + size


def with_metadata(data: bytes, info: dict) -> bytes:
    """A .tflite written elsewhere (a peer converter's) with qcompile's runner metadata added, so the
    same runner and evaluation can drive it. Buffers stored after the flatbuffer are brought inside it;
    other tables are kept as they are."""
    S = deps.schema()
    model_t = _unpacked(S, data)
    buffer_cls = _aligned_buffer_class(S)
    model_t.metadata = [md for md in (model_t.metadata or []) if md.name not in (METADATA_KEY, METADATA_KEY.encode())]
    md = S.MetadataT()
    md.name = METADATA_KEY
    md.buffer = len(model_t.buffers)
    model_t.buffers.append(buffer_cls(np.frombuffer(json.dumps(info, sort_keys=True).encode(), np.uint8)))
    model_t.metadata.append(md)
    return _finish(model_t, len(data))


def with_outputs(data: bytes, subgraph: int, tensors) -> bytes:
    """A copy of a .tflite (under 2 GiB) whose subgraph `subgraph` also outputs `tensors`. The
    interpreter's memory planner never reuses an output, so they can be read after a run, where
    `experimental_preserve_all_tensors` would keep every float intermediate as well: 9.9 GB for SD
    1.5's int8 UNet at 64x64 latents (its attention scores alone 5 GB), against 0.47 GB of int8 tensors."""
    S = deps.schema()
    model_t = _unpacked(S, data)
    sg = model_t.subgraphs[subgraph]
    have = [int(t) for t in (sg.outputs if sg.outputs is not None else [])]
    extra = [int(t) for t in dict.fromkeys(tensors) if int(t) not in set(have)]
    sg.outputs = np.asarray(have + extra, np.int32)
    return _finish(model_t, len(data))


def _unpacked(S, data: bytes):
    """The object-API model of `data`, every buffer inside it and 16-byte aligned when packed again."""
    model_t = S.ModelT.InitFromPackedBuf(data, 0)
    buffer_cls = _aligned_buffer_class(S)

    def raw(b) -> np.ndarray | None:
        if b.offset > 1:
            return np.frombuffer(data, np.uint8, count=b.size, offset=b.offset)
        return None if b.data is None else np.asarray(b.data, np.uint8)

    model_t.buffers = [buffer_cls(raw(b)) for b in model_t.buffers]
    return model_t


def set_metadata(model: ModelBuilder, info: dict) -> None:
    """What the runner needs to present the model as its ONNX original (names, layouts, batch)."""
    model.metadata[METADATA_KEY] = json.dumps(info, sort_keys=True).encode()


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _sharing_builder(fb, size: int):
    """A flatbuffers Builder that writes each distinct string, numeric vector and `_shared` table once."""

    class SharingBuilder(fb.Builder):
        def __init__(self, initial_size: int):
            super().__init__(initial_size)
            self.memo: dict = {}

        def CreateString(self, s, encoding="utf-8", errors="strict"):  # noqa: N802 (flatbuffers' naming)
            key = ("str", s)
            if key not in self.memo:
                self.memo[key] = super().CreateString(s, encoding, errors)
            return self.memo[key]

        def CreateNumpyVector(self, x):  # noqa: N802
            key = ("vec", x.dtype.str, x.tobytes())
            if key not in self.memo:
                self.memo[key] = super().CreateNumpyVector(x)
            return self.memo[key]

    return SharingBuilder(size)


def _shared(cls, key):
    """An object-API table `cls()` packed once per builder for each distinct `key` (its content)."""
    table = _shared_class(cls)()
    table.memo_key = (cls.__name__, _hashable(key))
    return table


@functools.cache
def _shared_class(cls):
    class Shared(cls):
        def Pack(self, builder):  # noqa: N802 (flatbuffers' naming)
            if self.memo_key not in builder.memo:
                builder.memo[self.memo_key] = super().Pack(builder)
            return builder.memo[self.memo_key]

    return Shared


def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    return value


def _finish(model_t, size_hint: int = 0) -> bytes:
    fb = deps.flatbuffers()
    # Sized up front: the builder otherwise doubles (and copies) its buffer on the way to the weights' size.
    builder = _sharing_builder(fb, min(size_hint + (1 << 20), fb.Builder.MAX_BUFFER_SIZE))
    try:
        root = model_t.Pack(builder)
        builder.Finish(root, file_identifier=FILE_IDENTIFIER)
        out = bytes(builder.Output())
    except fb.builder.BuilderSizeError:
        out = None
    if out is None or len(out) > FLATBUFFER_LIMIT:
        raise UserError(f"tflite: the model's tables exceed the flatbuffer limit of {FLATBUFFER_LIMIT} bytes "
                        "(2 GiB, 32-bit offsets) even with the weights outside the flatbuffer")
    return out


def _aligned_buffer_class(S):
    class AlignedBuffer(S.BufferT):
        """A buffer whose bytes start on a 16-byte boundary (the object API aligns to the element size)."""

        def __init__(self, raw: np.ndarray | None, offset: int = 0, size: int = 0):
            super().__init__(None, offset, size)
            self.raw = raw

        def Pack(self, builder):  # noqa: N802 (flatbuffers' naming)
            vector = None
            if self.raw is not None and self.raw.size:
                n = int(self.raw.size)
                builder.StartVector(1, n, BUFFER_ALIGN)
                builder.head -= n
                builder.Bytes[builder.head:builder.head + n] = self.raw.tobytes()
                vector = builder.EndVector()
            S.BufferStart(builder)
            if vector is not None:
                S.BufferAddData(builder, vector)
            S.BufferAddOffset(builder, self.offset)
            S.BufferAddSize(builder, self.size)
            return S.BufferEnd(builder)

    return AlignedBuffer


def _model_t(model: ModelBuilder, *, inline: bool, offsets: list[tuple[int, int]] | None = None):
    S = deps.schema()
    buffer_cls = _aligned_buffer_class(S)
    m = S.ModelT()
    m.version = SCHEMA_VERSION
    m.description = model.description
    opcodes: dict[tuple[str, int], int] = {}
    m.subgraphs = [_subgraph_t(S, sg, opcodes) for sg in model.subgraphs]
    m.operatorCodes = []
    for (code, version), _ in sorted(opcodes.items(), key=lambda kv: kv[1]):
        oc = S.OperatorCodeT()
        oc.builtinCode = getattr(S.BuiltinOperator, code)
        oc.deprecatedBuiltinCode = min(oc.builtinCode, _DEPRECATED_CODE_LIMIT)
        oc.version = version
        m.operatorCodes.append(oc)
    if inline:
        m.buffers = [buffer_cls(b) for b in model.buffers]
    else:
        m.buffers = [buffer_cls(None, off, size) if size else buffer_cls(None) for off, size in offsets]
    m.metadata = []
    for name, blob in model.metadata.items():
        md = S.MetadataT()
        md.name = name
        md.buffer = len(m.buffers)
        m.buffers.append(buffer_cls(np.frombuffer(blob, np.uint8)))
        m.metadata.append(md)
    m.signatureDefs = []
    for sig in model.signatures:
        sd = S.SignatureDefT()
        sd.signatureKey = sig.key
        sd.subgraphIndex = sig.subgraph
        sd.inputs = [_tensor_map(S, n, i) for n, i in sig.inputs]
        sd.outputs = [_tensor_map(S, n, i) for n, i in sig.outputs]
        m.signatureDefs.append(sd)
    return m


def _tensor_map(S, name: str, index: int):
    tm = S.TensorMapT()
    tm.name = name
    tm.tensorIndex = index
    return tm


def _subgraph_t(S, sg: Subgraph, opcodes: dict[tuple[str, int], int]):
    out = S.SubGraphT()
    out.name = sg.name
    out.inputs, out.outputs = _int32(sg.inputs), _int32(sg.outputs)
    out.tensors = [_tensor_t(S, spec) for spec in sg.tensors]
    out.operators = []
    for op in sg.ops:
        ins = [sg.tensors[i] if i >= 0 else None for i in op.inputs]
        version = op_version(op.code, ins, [sg.tensors[i] for i in op.outputs], dict(op.options))
        key = (op.code, version)
        if key not in opcodes:
            opcodes[key] = len(opcodes)
        o = _shared(S.OperatorT, (opcodes[key], op.inputs, op.outputs, op.options_type, op.options))
        o.opcodeIndex = opcodes[key]
        o.inputs, o.outputs = _int32(op.inputs), _int32(op.outputs)
        if op.options_type is not None:
            opts = _shared(getattr(S, op.options_type + "T"), (op.options_type, op.options))
            for field_name, value in op.options:
                if not hasattr(opts, field_name):
                    raise AttributeError(f"{op.options_type} has no field {field_name}")
                setattr(opts, field_name, value)
            o.builtinOptionsType = getattr(S.BuiltinOptions, op.options_type)
            o.builtinOptions = opts
        out.operators.append(o)
    return out


def _tensor_t(S, spec):
    t = _shared(S.TensorT, (spec.name, spec.shape, spec.dtype.str, spec.buffer, spec.quant))
    t.name = spec.name
    t.shape = _int32(spec.shape)
    t.type = getattr(S.TensorType, tflite_type(spec.dtype))
    t.buffer = spec.buffer
    if spec.quant is not None:
        q = _shared(S.QuantizationParametersT, spec.quant)
        q.scale = np.asarray(spec.quant.scale, np.float32)
        q.zeroPoint = np.asarray(spec.quant.zero_point, np.int64)
        q.quantizedDimension = spec.quant.axis
        t.quantization = q
    return t


def _int32(values) -> np.ndarray:
    return np.asarray(list(values), np.int32).reshape(-1)
