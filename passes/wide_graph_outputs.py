"""Graph outputs at 16 bits in an 8-bit integer graph: the op computing each output runs at A16W8.

Why: an 8-bit output is the coarsest tensor of a denoiser's call and the one the sampler integrates.
On the reference UNet at W8A8 the 8-bit eps output alone carries 0.009 rms of rounding noise (its
step is 0.03), and HTP rounds that last requantization differently from onnxruntime: on `conv_out`,
with identical integer inputs, 3-8% of outputs land one step lower on HTP, a mean eps error of
-0.001 to -0.0025 that changes with each bucket's scales. A sampler adds that bias up over every
step; it cost K=4 most of its gain in free sampling on HTP (targets/qnn/README.md). At 16 bits the
step is 257 times finer and the bias falls below 0.001 (measured on the same layer).

What the rewrite does, on a graph `insert_qdq_integer` made (every tensor already in Q/DQ pairs):
- the output's Q/DQ pair, and those of data-movement ops between it and the op that computes it,
  move to the wide dtype over the same float range: scale / 257, zero point mapped so q16 = 257 q8
  (exact, for every 8-bit value);
- each activation input of that op gets a DequantizeLinear -> QuantizeLinear(wide) pair, which HTP
  runs as a Convert (exact too); the op itself becomes an A16W8 kernel, which HTP has;
- its int32 bias (input 2 of `bias_ops`) follows its input's scale: value x 257, scale / 257.
Its weights stay 8-bit. Wide activations need QuantizeLinear-21, so the opset is raised to 21.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.errors import UserError
from qcompile.graph_io import constant_values, raise_opset, replace_input
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.insert_qdq import activation_qdq_pair, insert_qdq_pair
from qcompile.passes.insert_qdq_integer import WIDE_QDQ_OPSET
from qcompile.quant import grid_ratio, widen_full_range, widen_qparams
from qcompile.rewrite import producer

PASS_NAME = "wide-graph-outputs"


class WideGraphOutputs(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.QDQ_PAIRED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, caps: TargetCaps):
        self.caps = caps
        self.narrow = caps.activation_dtype
        self.wide = caps.output_dtype or caps.activation_dtype

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.narrow.bits >= self.wide.bits:
            return PassResult(modified=False, detail=f"outputs stay {self.narrow.value}")
        widened: list[str] = []
        fixed = {op for op, _, _ in self.caps.fixed_output_qparams}
        for out in graph.outputs:
            pairs, op = self._chain(out)
            if op is None or self._is_wide(pairs[0][0]):  # already wide (mixed precision widened it)
                continue
            for q, dq in pairs:
                self._set_params(q, dq, full_range=op.op in fixed)
            self._widen_inputs(graph, op)
            widened.append(op.name)
        if not widened:
            return PassResult(modified=False, detail="no quantized graph output")
        if graph.opset < WIDE_QDQ_OPSET:
            raise_opset(graph, WIDE_QDQ_OPSET)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=True, detail=f"{len(widened)} output op(s) at {self.wide.value}: "
                                                + ", ".join(widened))

    def _chain(self, out: gs.Tensor) -> tuple[list[tuple[gs.Node, gs.Node]], gs.Node | None]:
        """The Q/DQ pairs from a graph output back to the op that computes it (through data-movement
        ops, whose output shares its input's parameters), and that op; no op when a pair on the way
        also feeds another consumer (widening it would change that consumer's input too)."""
        pairs: list[tuple[gs.Node, gs.Node]] = []
        t = out
        while (pair := activation_qdq_pair(t)) is not None:
            q, dq = pair
            if len(q.outputs[0].outputs) != 1 or len(dq.outputs[0].outputs) != (1 if pairs else 0):
                return pairs, None
            pairs.append(pair)
            src = q.inputs[0]
            op = producer(src)
            if op is None or len(src.outputs) != 1:
                return pairs, None
            if op.op not in self.caps.same_scale_ops:
                return pairs, op
            t = op.inputs[0]
        return pairs, None

    def _is_wide(self, q: gs.Node) -> bool:
        return np.dtype(constant_values(q.inputs[2]).dtype) == self.wide.numpy

    def _set_params(self, q: gs.Node, dq: gs.Node, *, full_range: bool = False) -> None:
        """`full_range`: the op's kernel fixes its output encoding (HTP's Sigmoid: [0, 1) over every code
        of the width, 1/65536 at 16 bits); the wide grid then spans the same range in wide codes, not
        the narrow grid split 257 ways (1/65792: HTP's 16-bit Sigmoid read with it was 0.4% low at the
        top, 255 LSB; found by tests/test_fuzz_qnn.py)."""
        if self._is_wide(q):
            return
        scale, zero = constant_values(q.inputs[1]), constant_values(q.inputs[2])
        qp = (widen_full_range if full_range else widen_qparams)(scale, zero, self.narrow, self.wide)
        scale = gs.Constant(f"{q.inputs[0].name}_scale_{self.wide.value}", qp.scale)
        zero = gs.Constant(f"{q.inputs[0].name}_zero_point_{self.wide.value}", qp.zero_point)
        for node in (q, dq):
            node.inputs[1], node.inputs[2] = scale, zero
        q.outputs[0].dtype = self.wide.numpy

    def _widen_inputs(self, graph: gs.Graph, op: gs.Node) -> None:
        converted: dict[str, gs.Variable] = {}
        first = op.inputs[0].name
        for t in list(op.inputs):
            if (pair := activation_qdq_pair(t)) is None or self._is_wide(pair[0]):
                continue
            if t.name not in converted:
                dq = pair[1]
                qp = widen_qparams(constant_values(dq.inputs[1]), constant_values(dq.inputs[2]), self.narrow, self.wide)
                converted[t.name] = insert_qdq_pair(graph, t, qp, PASS_NAME)
            replace_input(op, t, converted[t.name])
        # the bias is stored at s_input * s_weight: it follows input 0's new scale
        if op.op in self.caps.bias_ops and len(op.inputs) > 2 and first in converted:
            self._rescale_bias(op, op.inputs[2])

    def _rescale_bias(self, op: gs.Node, t: gs.Tensor) -> None:
        dq = producer(t)
        values = constant_values(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
        if values is None or values.dtype != np.int32:
            return
        ratio = grid_ratio(self.narrow, self.wide)
        wide = values.astype(np.int64) * ratio
        if np.abs(wide).max(initial=0) > np.iinfo(np.int32).max:
            raise UserError(f"{PASS_NAME}: node '{op.name}': its int32 bias overflows at {self.wide.value} "
                            f"inputs (largest {int(np.abs(values).max())} x {ratio})")
        scale = np.asarray(np.asarray(constant_values(dq.inputs[1]), np.float64) / ratio, np.float32)
        dq.inputs[0] = gs.Constant(f"{dq.inputs[0].name}_{self.wide.value}", np.asarray(wide, np.int32))
        dq.inputs[1] = gs.Constant(f"{dq.inputs[1].name}_{self.wide.value}", scale)
