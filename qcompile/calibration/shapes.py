"""Concrete tensor sizes of a graph with symbolic axes, for the inputs a calibration feeds it.

Why: the statistics pass cuts the model into segments whose observed tensors fit a byte budget, so it
must know each tensor's size before running anything. An export with dynamic latent size and prompt
length has symbolic dims everywhere ('8*height_over_8', '64*s34*s61', 'tokens'); counting such a dim
as 1 made every tensor look tiny, the whole SD 1.5 UNet one segment, and a batch of 16 rows would have
held 25 GB of observed activations at once.

How: torch.export writes most dims as products of symbols and integers. The graph inputs bind some
symbols directly (sample H = 8*height_over_8 = 32 gives height_over_8 = 4); ONNX shape inference on a
copy whose inputs are concrete gives concrete dims for many more tensors, and each such tensor whose
exported dim is a single unknown symbol times known factors binds that symbol (a '4*s34' that
inference says is 16 gives s34 = 4). Every dim is then evaluated from its expression; what no
expression or inference resolves (a reshape's 'unk__' dim) is reported as unknown, and the caller
counts it conservatively.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping, Sequence

import onnx

_OPS = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub, ast.FloorDiv: operator.floordiv}


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
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


def concrete_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]],
                    names: Sequence[str]) -> dict[str, tuple[int, ...] | None]:
    """Shape of each of `names` when the graph inputs have `input_shapes` (None where unresolved).
    `model` is the protobuf alone (no external data is read)."""
    declared = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    symbols: dict[str, int] = {}
    for name, shape in input_shapes.items():
        for d, v in zip(declared.get(name, []), shape, strict=False):
            if isinstance(d, str):
                _bind(d, int(v), symbols)

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    del pinned.graph.value_info[:]
    for inp in pinned.graph.input:
        if inp.name in input_shapes:
            for d, v in zip(inp.type.tensor_type.shape.dim, input_shapes[inp.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    inferred = {v.name: _dims(v) for v in onnx.shape_inference.infer_shapes(pinned, data_prop=True).graph.value_info}
    for _ in range(3):  # a symbol bound late can resolve a product seen earlier
        for name, dims in declared.items():
            for d, v in zip(dims, inferred.get(name, []), strict=False):
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
