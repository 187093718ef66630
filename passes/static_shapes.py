"""Fix the batch size and make every shape static: TFLite tensors and QNN graphs have static shapes.

Exporters leave the batch symbolic, with Shape -> Gather -> Concat chains computing Reshape targets.
With the inputs' batch fixed, shape inference makes every tensor static and constant folding turns
those chains into constants, which the lowering needs (RESHAPE targets, slice bounds, ...).
Quantize/Dequantize nodes are never folded, so the Q/DQ contract is untouched.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.errors import UserError
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassManager, PassResult
from qcompile.passes.cleanup import EliminateDeadNodes
from qcompile.passes.fold_constants import FoldConstants
from qcompile.passes.infer_shapes import InferShapes


def _is_static(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


class StaticShapes(Pass):
    name = "static-shapes"
    ensures = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.QDQ_PAIRED})

    def __init__(self, batch: int):
        if batch < 1:
            raise UserError(f"static shapes: batch must be at least 1 (got {batch})")
        self.batch = batch
        # Inputs exported without a symbolic batch (Flux's positional ids), set by run(): the same for
        # every sample, so a host pass may treat them like the timestep.
        self.unbatched: tuple[str, ...] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fixed = 0
        unbatched = []
        for t in graph.inputs:
            if t.shape is None:
                raise UserError(f"static shapes: graph input '{t.name}' has no shape")
            shape = list(t.shape)
            if shape and not _is_static(shape[0]):
                shape[0] = self.batch
                fixed += 1
            elif shape:
                unbatched.append(t.name)
            if not all(_is_static(d) for d in shape):
                raise UserError(f"static shapes: graph input '{t.name}' has symbolic dimensions {t.shape} besides the "
                                "batch; TFLite tensors are static")
            t.shape = shape
        self.unbatched = tuple(unbatched)
        before = len(graph.nodes)
        # A separate context: the inner passes' property bookkeeping is this pass's own business.
        PassManager([InferShapes(), FoldConstants(), EliminateDeadNodes()], fixed_point=True).run(graph, PassContext())
        folded = before - len(graph.nodes)
        return PassResult(modified=bool(fixed or folded), detail=f"batch {self.batch}, {folded} nodes folded")
