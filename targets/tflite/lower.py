"""Lower an ONNX graph (float, or Q/DQ from InsertQDQ) into one TFLite subgraph.

The Q/DQ graph is the contract. A QuantizeLinear -> DequantizeLinear pair becomes one int8 tensor with
those parameters. An op whose inputs arrive through DequantizeLinear and whose only consumer is a
QuantizeLinear becomes the int8 TFLite op when TFLite can run it (CONV_2D with per-channel weights,
FULLY_CONNECTED, BATCH_MATMUL, ...); data-movement ops (reshape, transpose, slice, concat of equal
scales, nearest resize, pad with zero) run on int8 as they are, since they commute with
dequantization. Everything else runs in float, with DEQUANTIZE/QUANTIZE where values cross over.

Layouts: 4-D graph inputs are stored NHWC and activations stay in whatever layout their producer
left them (see layout.py); graph outputs keep theirs too, and the runner converts at the API.
Shapes must be static (`StaticShapes` runs first in the pipeline).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UserError
from qcompile.graph_io import constant_values
from qcompile.rewrite import unit_of
from qcompile.targets.tflite.builder import ModelBuilder, Quant
from qcompile.targets.tflite.layout import (
    Perm,
    after_reshape,
    channels_last,
    identity,
    invert,
    moves_only_unit_dims,
    relayout,
    stored_shape,
)
from qcompile.targets.tflite.values import ConstValue, Value

FLOAT = np.dtype(np.float32)


@dataclass(frozen=True)
class IOInfo:
    """One graph input or output as the runner presents it: ONNX name, shape and dtype, stored perm."""

    name: str
    shape: tuple[int, ...]
    perm: Perm
    dtype: str
    tensor: int

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "perm": list(self.perm), "dtype": self.dtype}


@dataclass(frozen=True)
class LoweredGraph:
    subgraph: int
    inputs: tuple[IOInfo, ...]
    outputs: tuple[IOInfo, ...]
    # ONNX QuantizeLinear outputs (activations) -> (tensor index, stored perm) of the int8 tensor that
    # holds them: what validation compares between the interpreter and onnxruntime.
    quantized: tuple[tuple[str, int, tuple[int, ...]], ...] = ()


class Lowering:
    """State of one lowering: the values bound to ONNX tensors and helpers the op handlers share."""

    def __init__(self, model: ModelBuilder, graph: gs.Graph, name: str):
        self.model = model
        self.sg = model.add_subgraph(name)
        self.subgraph_index = len(model.subgraphs) - 1
        self.graph = graph
        self.values: dict[str, Value] = {}
        self.consts: dict[str, ConstValue] = {}
        self.consumers: dict[str, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            for t in node.inputs:
                self.consumers[t.name].append(node)
        self.output_names = {t.name for t in graph.outputs}
        self.skip: set[str] = set()  # nodes already lowered as part of an annotated unit
        # unit id -> role -> nodes, for the units a fusion pass annotated (fuse_groupnorm)
        self.units: dict[str, dict[str, list[gs.Node]]] = {}
        for node in graph.nodes:
            if (found := unit_of(node)) is not None:
                self.units.setdefault(found[0], {}).setdefault(found[1], []).append(node)
        self.node: gs.Node | None = None
        self._cache: dict[tuple, Value] = {}

    # -- driving ------------------------------------------------------------------------------------
    def run(self, handlers) -> LoweredGraph:
        unsupported = {}
        for node in self.graph.nodes:
            if node.op not in handlers or node.domain not in (None, "", "ai.onnx"):
                unsupported.setdefault(node.op, node.name)
        if unsupported:  # all of them at once: one round trip for the user, not one per op
            listed = ", ".join(f"op {op} (node '{name}')" for op, name in unsupported.items())
            raise UserError(f"tflite: no TFLite lowering for {listed}")
        inputs = []
        for t in self.graph.inputs:
            shape = self.shape(t)
            dtype = np.dtype(t.dtype)
            perm = channels_last(4) if len(shape) == 4 and dtype == FLOAT else identity(len(shape))
            v = self.new_value(t.name, shape, perm, dtype)
            self.sg.inputs.append(v.tensor)
            self.values[t.name] = v
            inputs.append(IOInfo(t.name, shape, perm, dtype.name, v.tensor))
        for node in self.graph.nodes:
            if node.name in self.skip:
                continue
            self.node = node
            handlers[node.op](self, node)
        self.node = None
        outputs = []
        for t in self.graph.outputs:
            v = self.float_value(t)  # the ONNX output is float: an int8 value is dequantized
            if v.tensor in self.sg.outputs or v.tensor in self.sg.inputs:
                v = self.copy(v, t.name)
            self.sg.outputs.append(v.tensor)
            outputs.append(IOInfo(t.name, v.shape, v.perm, v.dtype.name, v.tensor))
        quantized = []
        for node in self.graph.nodes:
            v = self.values.get(node.outputs[0].name) if node.op == "QuantizeLinear" else None
            if v is not None and v.dtype == np.int8 and v.quant is not None:
                quantized.append((node.outputs[0].name, v.tensor, tuple(v.perm)))
        return LoweredGraph(self.subgraph_index, tuple(inputs), tuple(outputs), tuple(quantized))

    def unit(self, node: gs.Node) -> tuple[str, str, dict[str, list[gs.Node]]] | None:
        """(unit id, this node's role, role -> the unit's nodes) when a fusion pass annotated `node`."""
        found = unit_of(node)
        return None if found is None else (found[0], found[1], self.units[found[0]])

    def fail(self, message: str) -> UserError:
        where = f" (node '{self.node.name}', op {self.node.op})" if self.node is not None else ""
        return UserError(f"tflite: {message}{where}")

    # -- tensors and constants -----------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple[int, ...]:
        c = self.const(t)
        if c is not None:
            return tuple(c.values.shape)
        if t.shape is None or not all(isinstance(d, int | np.integer) and d >= 0 for d in t.shape):
            raise self.fail(f"tensor '{t.name}' has no static shape {t.shape} (TFLite tensors are static)")
        return tuple(int(d) for d in t.shape)

    def const(self, t: gs.Tensor) -> ConstValue | None:
        if t.name in self.consts:
            return self.consts[t.name]
        if t.name in self.values:
            return None
        values = constant_values(t)
        if values is None:
            return None
        c = ConstValue(np.asarray(values))
        self.consts[t.name] = c
        return c

    def const_ints(self, t: gs.Tensor) -> list[int]:
        c = self.const(t)
        if c is None:
            raise self.fail(f"input '{t.name}' must be a constant")
        return [int(v) for v in np.asarray(c.values).reshape(-1)]

    def new_value(self, name: str, shape: Sequence[int], perm: Perm, dtype, quant: Quant | None = None) -> Value:
        shape = tuple(int(d) for d in shape)
        index = self.sg.add_tensor(name, stored_shape(shape, perm), dtype, quant)
        return Value(index, shape, tuple(perm), np.dtype(dtype), quant)

    def like(self, v: Value, name: str, shape: Sequence[int] | None = None, perm: Perm | None = None,
             dtype=None, quant: Quant | None | bool = True) -> Value:
        """A new value shaped like `v` (same quant unless told otherwise)."""
        q = v.quant if quant is True else (quant or None)
        return self.new_value(name, v.shape if shape is None else shape, v.perm if perm is None else perm,
                              v.dtype if dtype is None else dtype, q)

    def constant(self, name: str, values: np.ndarray, quant: Quant | None = None) -> int:
        return self.model.constant(self.sg, name, np.ascontiguousarray(values), quant)

    def int32(self, name: str, values: Sequence[int]) -> int:
        return self.constant(name, np.asarray(values, np.int32))

    def bind(self, t: gs.Tensor, v: Value) -> None:
        self.values[t.name] = v

    def name(self, suffix: str) -> str:
        return f"{self.node.name}/{suffix}" if self.node is not None else suffix

    def op(self, code: str, inputs: Sequence[Value | int | None], outputs: Sequence[Value | int],
           options_type: str | None = None, **options) -> None:
        def index(x):
            return -1 if x is None else x.tensor if isinstance(x, Value) else int(x)

        self.sg.add_op(code, [index(x) for x in inputs], [index(x) for x in outputs], options_type, **options)

    # -- values ---------------------------------------------------------------------------------------
    def value(self, t: gs.Tensor) -> Value:
        """The stored value of `t`; a constant is materialised as a float (or integer) tensor."""
        v = self.values.get(t.name)
        if v is not None:
            return v
        c = self.const(t)
        if c is None:
            raise self.fail(f"tensor '{t.name}' is used before it is produced")
        data = c.values
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        v = Value(self.constant(t.name, data), tuple(data.shape), identity(data.ndim), data.dtype)
        self.values[t.name] = v
        return v

    def float_value(self, t: gs.Tensor | Value) -> Value:
        v = t if isinstance(t, Value) else self.value(t)
        if v.quant is None:
            return v
        # Cached per stored tensor, returned as `v`'s view of it: ONNX tensors that share storage (a
        # Transpose is only a perm) each keep their own shape and perm (elementwise ops keep the layout).
        key = ("dequantize", v.tensor)
        if key not in self._cache:
            out = self.like(v, self.sg.spec(v.tensor).name + "/dequantized", dtype=FLOAT, quant=None)
            self.op("DEQUANTIZE", [v], [out])
            self._cache[key] = out
        return Value(self._cache[key].tensor, v.shape, v.perm, FLOAT)

    def requantize(self, v: Value, quant: Quant) -> Value:
        """`v` (float or int8) as int8 with `quant`: QUANTIZE, or nothing when it already is."""
        if v.quant == quant:
            return v
        key = ("quantize", v.tensor, quant)
        if key not in self._cache:
            out = self.like(v, self.sg.spec(v.tensor).name + "/requantized", dtype=np.int8, quant=quant)
            self.op("QUANTIZE", [v], [out])
            self._cache[key] = out
        return Value(self._cache[key].tensor, v.shape, v.perm, np.dtype(np.int8), quant)

    def to_layout(self, v: Value, perm: Perm) -> Value:
        """`v` stored with `perm`: a TRANSPOSE, or a RESHAPE when only unit axes move."""
        perm = tuple(perm)
        if v.perm == perm:
            return v
        tperm = relayout(v.perm, perm)
        key = ("layout", v.tensor, tperm)  # the stored bytes moved by `tperm`, whichever view asks
        if key not in self._cache:
            out = self.like(v, self.sg.spec(v.tensor).name + "/" + "".join(map(str, perm)), perm=perm)
            if moves_only_unit_dims(v.stored_shape, tperm):
                self.op("RESHAPE", [v, self.int32(self.name("shape"), out.stored_shape)], [out])
            else:
                self.op("TRANSPOSE", [v, self.int32(self.name("perm"), tperm)], [out])
            self._cache[key] = out
        return Value(self._cache[key].tensor, v.shape, perm, v.dtype, v.quant)

    def reshape(self, v: Value, shape: Sequence[int], perm: Perm, name: str) -> Value:
        out = self.like(v, name, shape=shape, perm=perm)
        self.op("RESHAPE", [v, self.int32(name + "/shape", out.stored_shape)], [out])
        return out

    def copy(self, v: Value, name: str) -> Value:
        return self.reshape(v, v.shape, v.perm, name)

    def operand(self, t: gs.Tensor, rank: int, perm: Perm, *, quantized: bool = False) -> Value:
        """Input `t` of an elementwise op, broadcast-ready: rank `rank`, stored with `perm`.

        Constants are reshaped and permuted in numpy; with `quantized`, a quantized constant keeps
        its int8 storage (per-tensor only), otherwise the float value is used.
        """
        c = self.const(t)
        if c is not None:
            return self.const_operand(t.name, c, rank, perm, quantized=quantized)
        v = self.value(t) if quantized else self.float_value(t)
        if v.rank < rank:
            lifted = (1,) * (rank - v.rank) + v.shape
            kept = after_reshape(v.shape, v.perm, lifted)  # only unit axes are added: always possible
            if moves_only_unit_dims(stored_shape(lifted, kept), relayout(kept, perm)):
                kept = tuple(perm)
            v = self.view(v, lifted, kept, self.name(f"{t.name}/rank{rank}"))
        return self.to_layout(v, perm)

    def const_operand(self, name: str, c: ConstValue | np.ndarray, rank: int, perm: Perm, *,
                      quantized: bool = False) -> Value:
        """A constant lifted to `rank` (leading unit axes, as numpy broadcasting does) and permuted."""
        c = c if isinstance(c, ConstValue) else ConstValue(np.asarray(c))
        lift = (1,) * (rank - c.values.ndim) + tuple(c.values.shape)
        tag = "/" + "".join(map(str, perm))
        if quantized and c.quantized and c.qparams.axis is None:
            raw = np.transpose(c.raw.reshape(lift), perm)
            quant = Quant.of(c.qparams.scale, c.qparams.zero_point)
            return Value(self.constant(name + tag, raw, quant), lift, tuple(perm), raw.dtype, quant)
        data = np.asarray(c.values)
        data = data.astype(np.float32) if data.dtype == np.float64 else data
        data = np.transpose(data.reshape(lift), perm)
        return Value(self.constant(name + tag, data), lift, tuple(perm), data.dtype)

    def view(self, v: Value, shape: Sequence[int], perm: Perm, name: str) -> Value:
        """`v` seen with another ONNX shape and perm over the same bytes: free when the stored shape is
        unchanged, else a RESHAPE."""
        shape, perm = tuple(int(d) for d in shape), tuple(perm)
        if stored_shape(shape, perm) == v.stored_shape:
            return Value(v.tensor, shape, perm, v.dtype, v.quant)
        return self.reshape(v, shape, perm, name)

    def out_quant(self, node: gs.Node, index: int = 0) -> Quant | None:
        """Parameters of the QuantizeLinear that is the only reader of `node`'s output, if any."""
        t = node.outputs[index]
        readers = self.consumers.get(t.name, [])
        if t.name in self.output_names or len(readers) != 1 or readers[0].op != "QuantizeLinear":
            return None
        return quantize_node_quant(self, readers[0])

    def common_perm(self, tensors: Sequence[gs.Tensor], rank: int) -> Perm:
        """The stored layout most activation inputs of full rank already have (identity when none)."""
        counts: dict[Perm, int] = {}
        for t in tensors:
            v = self.values.get(t.name)
            if v is not None and v.rank == rank:
                counts[v.perm] = counts.get(v.perm, 0) + 1
        return max(counts, key=counts.get) if counts else identity(rank)

    def axis_in_storage(self, v: Value, axis: int) -> int:
        return invert(v.perm)[axis % v.rank]


def quantize_node_quant(ctx: Lowering, node: gs.Node) -> Quant | None:
    """Per-tensor int8 parameters of a QuantizeLinear/DequantizeLinear node, None otherwise."""
    scale = ctx.const(node.inputs[1])
    zero = ctx.const(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None or scale.values.size != 1:
        return None
    zp_dtype = zero.values.dtype if zero is not None else np.dtype(np.uint8)
    if zp_dtype != np.int8:
        return None
    return Quant.per_tensor(float(scale.values.reshape(-1)[0]), int(zero.values.reshape(-1)[0]))
