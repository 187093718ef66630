"""Load and save ONNX graphs as onnx-graphsurgeon IR without pulling weights into memory.

Diffusion models pass 2 GB (the protobuf limit) easily, so weights always live in an external data
file. On load, every external initializer becomes an `ExternalValues`: nothing is read until a pass
asks for the values, and then through a read-only memory map. On save, untouched weights are copied
file to file in chunks; only tensors a pass created or changed are serialised from memory. Node
metadata (the exporter's module path, the pass that made a node) rides along on `node.meta`, because
onnx-graphsurgeon itself drops `metadata_props`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompile.atomic import atomic_path
from qcompile.errors import UserError

# Tensors smaller than this stay inside the protobuf. int64/int32 tensors may be shapes, which
# onnxruntime refuses to read from external data, so they stay inline up to 1 KB; other tensors
# (per-channel weight scales and zero points) from 128 bytes go to the data file, where timestep
# buckets share them.
INLINE_LIMIT_BYTES = 1024
INLINE_LIMIT_SMALL_BYTES = 128
_SHAPE_LIKE_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})
COPY_CHUNK_BYTES = 64 << 20
# The external-data location of a tensor whose values are still in memory (`to_model_proto(weights=False)`).
IN_MEMORY_LOCATION = "qcompile:in-memory"
# Types onnx stores two to a byte: their bytes on file are not the in-memory array's.
_PACKED_TYPES = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1})
# Node metadata kept through load/save. Exporters attach stack traces to every node; carrying those
# through each pass and bucket copy would bloat every graph we write.
META_PREFIX = "qcompile."
MODULE_KEY = "qcompile.module"
PASS_KEY = "qcompile.pass"


class ExternalValues(LazyValues):
    """Constant values still in an external data file: memory-mapped on access, never copied into the proto."""

    def __init__(self, tensor: onnx.TensorProto, data_path: Path, offset: int, length: int):
        super().__init__(tensor)
        self.data_path = data_path
        self.offset = offset
        self.length = length

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        if self.length == 0:
            return np.zeros(self.shape, dtype=dtype)
        return np.memmap(self.data_path, dtype=dtype, mode="r", offset=self.offset, shape=tuple(self.shape))


def node_meta(node: gs.Node) -> dict[str, str]:
    """The node's metadata_props as a dict (created empty when missing)."""
    meta = node.__dict__.get("meta")
    if meta is None:
        meta = {}
        node.__dict__["meta"] = meta
    return meta


def module_path(node: gs.Node) -> str:
    """Dotted torch module path the node was exported from ('' when unknown)."""
    return node_meta(node).get(MODULE_KEY, "")


def raise_opset(graph: gs.Graph, opset: int) -> None:
    """Set the default domain's version; it lives in both `opset` and `import_domains` (the exporter
    reads the latter)."""
    graph.opset = opset
    if graph.import_domains is not None:
        graph.import_domains = [d for d in graph.import_domains if d.domain not in ("", "ai.onnx")] + \
            [onnx.helper.make_opsetid("", opset)]


def tag_new_node(node: gs.Node, pass_name: str, like: gs.Node | None = None) -> gs.Node:
    """Record which pass made `node` (provenance) and inherit the module path of the node it replaces."""
    meta = node_meta(node)
    meta[PASS_KEY] = pass_name
    if like is not None and module_path(like):
        meta[MODULE_KEY] = module_path(like)
    return node


def replace_input(consumer: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make `consumer` read `new` wherever it read `old` (graphsurgeon lists refuse slice assignment)."""
    for i, t in enumerate(consumer.inputs):
        if t is old:
            consumer.inputs[i] = new


def redirect_consumers(old: gs.Tensor, new: gs.Tensor, consumers: list[gs.Node] | None = None) -> None:
    """Every consumer of `old` (or the given ones) reads `new` instead."""
    for consumer in list(old.outputs) if consumers is None else consumers:
        replace_input(consumer, old, new)


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """A copy to rewrite independently (one per timestep bucket): nodes and tensors are new, weight
    values are shared (still lazy), node metadata and the graph's established properties carried over
    (onnx-graphsurgeon's own `copy` drops both)."""
    from qcompile.pass_manager import graph_properties

    new = graph.copy()
    for old_node, new_node in zip(graph.nodes, new.nodes, strict=True):
        meta = old_node.__dict__.get("meta")
        if meta:
            new_node.__dict__["meta"] = dict(meta)
    graph_properties(new).update(graph_properties(graph))
    return new


def load_graph(path: Path) -> gs.Graph:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on bad files
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    graph = gs.import_onnx(model)
    _attach_external_values(graph, path.parent)
    for gs_node, proto in zip(graph.nodes, model.graph.node, strict=True):
        kept = {p.key: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
        if kept:
            node_meta(gs_node).update(kept)
    return graph


def _attach_external_values(graph: gs.Graph, base_dir: Path) -> None:
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = tensor._values
        if type(values) is not LazyValues or not uses_external_data(values.tensor):
            continue
        info = {e.key: e.value for e in values.tensor.external_data}
        data_path = base_dir / info["location"]
        if not data_path.is_file():
            raise UserError(f"{data_path}: external data file of tensor '{tensor.name}' is missing")
        tensor._values = ExternalValues(
            values.tensor, data_path, int(info.get("offset", 0)), int(info.get("length", values.nbytes))
        )


def save_graph(graph: gs.Graph, path: Path, *, data_name: str | None = None) -> Path:
    """Save `graph` to `path` with every non-trivial tensor in one external file `data_name`.

    Both files are written under temporary names and renamed at the end.
    """
    path = Path(path)
    return save_graphs([(graph, path)], path.parent / (data_name or path.name + ".data"))[0]


def save_graphs(items: Sequence[tuple[gs.Graph, Path]], data_path: Path) -> list[Path]:
    """Save several graphs (one per timestep bucket) that share one external data file.

    A tensor with the same name and bytes in several graphs (the quantized weights) is stored once,
    so K buckets cost K small protobufs plus one set of weights.
    """
    data_path = Path(data_path)
    if any(Path(p).parent != data_path.parent for _, p in items):
        raise ValueError("models and their shared data file must sit in one folder")
    with atomic_path(data_path) as data_tmp, open(data_tmp, "wb") as out:
        writer = _DataWriter(out, data_path.name)
        protos = [(writer.externalize(to_model_proto(graph, weights=False), graph), Path(p)) for graph, p in items]
        out.flush()
        for model, p in protos:
            with atomic_path(p) as model_tmp:
                onnx.save_model(model, str(model_tmp))
        writer.rebind_sources(data_path)
    return [p for _, p in protos]


def save_bucket_graphs(graphs: Sequence[gs.Graph], folder: Path, stem: str = "model") -> tuple[tuple[str, ...], ...]:
    """One model per timestep bucket, all reading one weight file: `model.onnx` + `model.onnx.data`
    for one bucket, `model_t{k}.onnx` + `model.data` for several. Returns each bucket's files,
    relative to `folder`, model first."""
    folder = Path(folder)
    if len(graphs) == 1:
        save_graph(graphs[0], folder / f"{stem}.onnx")
        return ((f"{stem}.onnx", f"{stem}.onnx.data"),)
    names = [f"{stem}_t{k}.onnx" for k in range(len(graphs))]
    save_graphs([(g, folder / n) for g, n in zip(graphs, names, strict=True)], folder / f"{stem}.data")
    return tuple((n, f"{stem}.data") for n in names)


def _location(tensor: onnx.TensorProto) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


class _DataWriter:
    """Appends tensors to one data file, each (name, bytes) once, aligned for memory mapping."""

    def __init__(self, out, location: str):
        self.out = out
        self.location = location
        self.stored: dict[tuple[str, str], tuple[int, int]] = {}
        self.moved: list[tuple[ExternalValues, int, int]] = []

    def externalize(self, model: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
        sources = {
            name: t._values
            for name, t in graph.tensors().items()
            if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues)
        }
        constants = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
        for tensor in _all_initializers(model):
            if uses_external_data(tensor) and _location(tensor) == IN_MEMORY_LOCATION:
                # written one tensor at a time: the protobuf never holds the pass's weights
                data = np.ascontiguousarray(constants[tensor.name].values).tobytes()
                key = (tensor.name, hashlib.sha256(data).hexdigest())
                if key not in self.stored:
                    self.stored[key] = (self._align(), len(data))
                    self.out.write(data)
                del tensor.external_data[:]
                _set_external(tensor, self.location, *self.stored[key])
            elif uses_external_data(tensor):
                src = sources.get(tensor.name)
                if src is None:
                    raise RuntimeError(f"tensor '{tensor.name}' refers to external data with no known source")
                key = (tensor.name, f"{src.data_path}:{src.offset}:{src.length}")
                if key not in self.stored:
                    self.stored[key] = (self._align(), src.length)
                    _copy_range(src.data_path, src.offset, src.length, self.out)
                    self.moved.append((src, *self.stored[key]))
                _set_external(tensor, self.location, *self.stored[key])
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= _inline_limit(tensor):
                key = (tensor.name, hashlib.sha256(tensor.raw_data).hexdigest())
                if key not in self.stored:
                    self.stored[key] = (self._align(), len(tensor.raw_data))
                    self.out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
                _set_external(tensor, self.location, *self.stored[key])
        return model

    def _align(self, alignment: int = 64) -> int:
        pos = self.out.tell()
        pad = (-pos) % alignment
        if pad:
            self.out.write(b"\0" * pad)
        return pos + pad

    def rebind_sources(self, final: Path) -> None:
        """When saving over the file we read from, point the graph's lazy weights at the new layout."""
        for src, offset, length in self.moved:
            if src.data_path.resolve() == final.resolve():
                src.offset, src.length = offset, length


MAX_IR_VERSION = 10


def _stub_memory_values(graph: gs.Graph, swapped: list[tuple[gs.Constant, np.ndarray]]) -> None:
    """Swap the in-memory values of large constants for value-less external references, appending to
    `swapped` what to put back (as it goes: an error part-way still restores every one)."""
    for tensor in graph.tensors().values():
        values = tensor._values if isinstance(tensor, gs.Constant) else None
        if not isinstance(values, np.ndarray) or values.nbytes < INLINE_LIMIT_BYTES:
            continue
        data_type = dtype_to_onnx(tensor.dtype)
        if dtype_to_onnx(tensor.export_dtype) != data_type or data_type in _PACKED_TYPES:
            continue  # converted or packed on export (float32 -> float8, int4 pairs): keep the values
        stub = onnx.TensorProto(name=tensor.name, dims=values.shape, data_type=data_type,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=IN_MEMORY_LOCATION)
        stub.external_data.add(key="length", value=str(values.nbytes))
        swapped.append((tensor, values))
        tensor._values = LazyValues(stub)


def to_model_proto(graph: gs.Graph, *, weights: bool = True) -> onnx.ModelProto:
    """The graph as a ModelProto. `weights=False` leaves out the values of every tensor a pass made in
    memory (the quantized weights) above INLINE_LIMIT_BYTES, keeping their type and shape, as weights
    read from a file already are: for shape inference, which needs no values beyond shape-like
    constants, and which would otherwise serialise every int8 weight into one protobuf (over its 2 GB
    limit for an SDXL-size UNet, and a copy of them in memory)."""
    swapped: list[tuple[gs.Constant, np.ndarray]] = []
    try:
        if not weights:
            _stub_memory_values(graph, swapped)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in swapped:
            tensor._values = values
    # A graph built from scratch gets onnx's newest IR version (14 in onnx 1.23), which onnxruntime 1.31
    # refuses; IR 10 is what onnxruntime takes for every opset qcompile writes (20, 21; 23 for RMSNormalization).
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    for gs_node, proto in zip(graph.nodes, model.graph.node, strict=True):
        meta = gs_node.__dict__.get("meta")
        if meta:
            del proto.metadata_props[:]
            for key, value in meta.items():
                proto.metadata_props.add(key=key, value=value)
    return model


def _all_initializers(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _copy_range(src: Path, offset: int, length: int, out) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(COPY_CHUNK_BYTES, left))
            if not chunk:
                raise UserError(f"{src}: external data file is shorter than its model says")
            out.write(chunk)
            left -= len(chunk)


def _inline_limit(tensor: onnx.TensorProto) -> int:
    return INLINE_LIMIT_BYTES if tensor.data_type in _SHAPE_LIKE_TYPES else INLINE_LIMIT_SMALL_BYTES


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of a Constant (or of a Constant node's output), else None.

    Lazy values are loaded without caching them on the tensor (graphsurgeon's `.values` would), so a
    pass that only looks at a weight leaves it external, to be copied file to file on save.
    """
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        return np.asarray(values.load() if isinstance(values, LazyValues) else values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None
