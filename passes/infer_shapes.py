"""Shape inference through ONNX's inferencer, on a weight-free copy of the graph.

The graph is exported without weight values (those read from a file stay references, those a pass
made in memory are left out: `to_model_proto(weights=False)`), so inference costs no weight memory
and no protobuf limit applies, even for multi-GB models. Inferred dtypes and shapes are copied onto the IR tensors.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

from qcompile.graph_io import to_model_proto
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult


class InferShapes(Pass):
    name = "infer-shapes"
    ensures = frozenset({GraphProperty.SHAPES_KNOWN})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.QDQ_PAIRED})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        model = to_model_proto(graph, weights=False)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        infos = {vi.name: vi for vi in inferred.graph.value_info}
        infos.update({vi.name: vi for vi in inferred.graph.output})
        updated = 0
        for name, tensor in graph.tensors().items():
            if isinstance(tensor, gs.Constant) or name not in infos:
                continue
            vi = infos[name]
            dtype = get_onnx_tensor_dtype(vi)
            shape = get_onnx_tensor_shape(vi)
            if tensor.dtype is None and dtype is not None:
                tensor.dtype = dtype
                updated += 1
            if shape is not None and tensor.shape != shape:
                tensor.shape = shape
                updated += 1
        # Annotations only: the graph's computation is unchanged.
        return PassResult(modified=False, detail=f"{updated} annotations")
