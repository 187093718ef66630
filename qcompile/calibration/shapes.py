"""Concrete tensor sizes of a graph with symbolic axes, for the inputs a calibration feeds it.

Why: the statistics pass cuts the model into segments whose observed tensors fit a byte budget, so it
must know each tensor's size before running anything. An export with dynamic latent size and prompt
length has symbolic dims everywhere ('8*height_over_8', '64*s34*s61', 'tokens'); counting such a dim
as 1 made every tensor look tiny, the whole SD 1.5 UNet one segment, and a batch of 16 rows would have
held 25 GB of observed activations at once.

How: onnxruntime's symbolic shape inference (`onnxruntime.tools.symbolic_shape_infer`, sympy-based,
maintained with the runtime) runs on a copy whose inputs are concrete and whose external weights are
turned into inputs of their declared shape (it reads no weight file); it follows the Shape -> Gather
-> Concat -> Reshape chains both exporters write and resolves every tensor of an SD 1.5 UNet in
0.2 s. Where it fails or leaves a dim symbolic, the exported dims are evaluated as expressions: the
graph inputs bind torch.export's symbols (sample H = 8*height_over_8 = 32 gives height_over_8 = 4),
ONNX's own shape inference binds more (a '4*s34' it says is 16 gives s34 = 4). What neither resolves
is reported as unknown, and the caller counts it conservatively.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping, Sequence

import onnx
from onnx.external_data_helper import uses_external_data

_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.FloorDiv: operator.floordiv}


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The declared dims (int, symbol expression, or None for an unnamed dim); None without a shape."""
    if not value.type.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else d.dim_param or None)
    return out


def _evaluate(expr: str, symbols: Mapping[str, int]) -> int | None:
    """Value of an integer expression of symbols (`*`, `+`, `-`, `//`), None when a symbol is unknown."""
    def walk(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            return None if a is None or b is None else _OPS[type(node.op)](a, b)
        return None
    try:
        return walk(ast.parse(expr, mode="eval").body)
    except SyntaxError:
        return None


def _bind(expr: str, value: int, symbols: dict[str, int]) -> None:
    """Learn the one unknown symbol of a product `k*a*b` from its value."""
    try:
        factors = _factors(ast.parse(expr, mode="eval").body)
    except SyntaxError:
        return
    if factors is None:
        return
    unknown = [f for f in factors if isinstance(f, str) and f not in symbols]
    if len(unknown) != 1 or factors.count(unknown[0]) != 1:
        return
    known = math.prod(symbols[f] if isinstance(f, str) else f for f in factors if f != unknown[0])
    if known and value % known == 0:
        symbols[unknown[0]] = value // known


def _factors(node: ast.AST) -> list[int | str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return [node.value]
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        a, b = _factors(node.left), _factors(node.right)
        return None if a is None or b is None else a + b
    return None


def _pinned(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy with concrete inputs, no value_info, and every external initializer turned into an input
    of its declared shape (shape inference then reads no weight file)."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    del pinned.graph.value_info[:]
    for inp in pinned.graph.input:
        if inp.name in input_shapes:
            for d, v in zip(inp.type.tensor_type.shape.dim, input_shapes[inp.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    inline = [t for t in pinned.graph.initializer if not uses_external_data(t)]
    for t in pinned.graph.initializer:
        if uses_external_data(t):
            pinned.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del pinned.graph.initializer[:]
    pinned.graph.initializer.extend(inline)
    return pinned


def _ort_symbolic(pinned: onnx.ModelProto) -> dict[str, list[int | str | None] | None]:
    """Dims by onnxruntime's symbolic shape inference; empty when it cannot run on this graph."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(pinned, auto_merge=True)
    except Exception:  # an op it has no rule for, or a graph it rejects: the expressions remain
        return {}
    if inferred is None:
        return {}
    return {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.output]}


def concrete_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]],
                    names: Sequence[str]) -> dict[str, tuple[int, ...] | None]:
    """Shape of each of `names` when the graph inputs have `input_shapes` (None where unresolved).
    `model` is the protobuf alone (no external data is read)."""
    pinned = _pinned(model, input_shapes)
    by_ort = _ort_symbolic(pinned)
    result = {n: _concrete(by_ort.get(n)) for n in names}
    missing = [n for n in names if result[n] is None]
    if missing:
        result.update(_from_expressions(model, pinned, input_shapes, missing))
    return result


def _concrete(dims: list[int | str | None] | None) -> tuple[int, ...] | None:
    if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return tuple(dims)


def _from_expressions(model: onnx.ModelProto, pinned: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]],
                      names: Sequence[str]) -> dict[str, tuple[int, ...] | None]:
    """The exported dims evaluated as expressions of the symbols the inputs and ONNX shape inference bind."""
    declared = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    symbols: dict[str, int] = {}
    for name, shape in input_shapes.items():
        for d, v in zip(declared.get(name) or [], shape, strict=False):
            if isinstance(d, str):
                _bind(d, int(v), symbols)
    try:
        graph = onnx.shape_inference.infer_shapes(pinned, data_prop=True).graph
        inferred = {v.name: _dims(v) for v in graph.value_info}
    except Exception:  # shape inference refuses the graph: the inputs' symbols alone
        inferred = {}
    for _ in range(3):  # a symbol bound late can resolve a product seen earlier
        for name, dims in declared.items():
            for d, v in zip(dims or [], inferred.get(name) or [], strict=False):
                if isinstance(d, str) and isinstance(v, int) and v > 0:
                    _bind(d, v, symbols)

    result: dict[str, tuple[int, ...] | None] = {}
    for name in names:
        if name in input_shapes:
            result[name] = tuple(int(v) for v in input_shapes[name])
            continue
        dims, known = declared.get(name), inferred.get(name)
        source = dims if dims is not None else known
        shape: list[int] = []
        for k, d in enumerate(source or []):
            v = d if isinstance(d, int) and d > 0 else _evaluate(d, symbols) if isinstance(d, str) else None
            if v is None and known is not None and k < len(known) and isinstance(known[k], int) and known[k] > 0:
                v = known[k]
            if v is None:
                break
            shape.append(v)
        result[name] = tuple(shape) if source is not None and len(shape) == len(source) else None
    return result
