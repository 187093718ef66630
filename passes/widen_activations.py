"""Mixed precision on an integer-only NPU: chosen activations at the wide type (16 bits), the ops that
compute or read them as A16W8 kernels, 8 bits everywhere else.

Why this shape: HTP has no float kernels to fall back to, but it runs 16-bit activations with 8-bit
weights (what W8A16 builds use throughout). It refuses an op whose activation inputs and outputs
differ in width (a Conv reading uint16 and writing uint8 is unsupported: measured on the simulator),
so width is a property of ops, and where a tensor crosses between an 8-bit and a 16-bit op a Convert
is inserted (a DequantizeLinear -> QuantizeLinear pair of the other width, which the QNN EP runs as
a Convert, as `wide_graph_outputs` does for the graph outputs).

What a request means: a layer taken out of the 8-bit graph has its activation inputs and outputs made
wide (found by node name on the rewritten graph: rewrites such as `linear_as_gemm` keep the layer's
name). A tensor made wide is stored at 16 bits, so the op computing it and every op reading it run
wide. A tensor one of those ops writes but which was not requested is stored at 16 bits too, and its
8-bit readers get a Convert down. Data-movement ops (`same_scale_ops`) carry their input's width and
parameters. Every 16-bit tensor uses the 16-bit grid of its 8-bit parameters (each 8-bit step split
into 257; `quant.widen_qparams`), so a Convert up is exact and a Convert down rounds as the 8-bit graph
did; the 16-bit range is therefore the 8-bit estimator's. The int32 bias of a wide op follows its
input's scale (x 257). Weights stay 8-bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.caps import TargetCaps
from qcompile.errors import UserError
from qcompile.graph_io import constant_values, raise_opset, replace_input
from qcompile.pass_manager import GraphProperty, Pass, PassContext, PassResult
from qcompile.passes.insert_qdq import activation_qdq_pair, insert_qdq_pair
from qcompile.passes.insert_qdq_integer import WIDE_QDQ_OPSET, unrenamed
from qcompile.quant import QParams, grid_ratio, widen_full_range, widen_qparams

PASS_NAME = "widen-activations"
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


class WidenActivations(Pass):
    name = PASS_NAME
    requires = frozenset({GraphProperty.QDQ_PAIRED})
    preserves = frozenset({GraphProperty.NODES_NAMED, GraphProperty.SHAPES_KNOWN, GraphProperty.QDQ_PAIRED})

    def __init__(self, layers: Sequence[str], caps: TargetCaps):
        self.layers = tuple(layers)
        self.caps = caps
        self.narrow = caps.activation_dtype
        self.wide = caps.wide_dtype

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not self.layers:
            return PassResult(modified=False, detail="nothing to widen")
        if self.wide is None:
            raise UserError(f"{PASS_NAME}: the target has no wider activation type than {self.narrow.value}")
        graph.toposort()
        pairs = self._primary_pairs(graph)
        wide_tensors = self._expand(self._layer_tensors(graph, pairs), pairs)
        wide_ops = self._wide_ops(wide_tensors, pairs)
        stored = self._storage(graph, pairs, wide_tensors, wide_ops)
        narrow_qp = {name: _qparams(dq) for name, (_, dq) in pairs.items()}
        fixed = {op for op, _, _ in self.caps.fixed_output_qparams}
        for name in stored:
            producer = self._producer(pairs[name])
            self._set_wide(*pairs[name], narrow_qp[name], full_range=producer is not None and producer.op in fixed)
        converts = 0
        for name, (_, dq) in pairs.items():
            converts += self._convert_readers(graph, dq, name in stored, narrow_qp[name], wide_ops, stored)
        for op in wide_ops:
            self._rescale_bias(op)
        if graph.opset < WIDE_QDQ_OPSET:
            raise_opset(graph, WIDE_QDQ_OPSET)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        names = {n.name for n in graph.nodes}
        off_device = sum(name not in names for name in self.layers)
        detail = f"{len(stored)} activations at {self.wide.value}, {len(wide_ops)} ops A16, {converts} converts"
        if off_device:
            detail += f"; {off_device} layer(s) not on the device"
        return PassResult(modified=True, detail=detail)

    # --- which tensors and ops ---------------------------------------------------------------------
    def _primary_pairs(self, graph: gs.Graph) -> dict[str, tuple[gs.Node, gs.Node]]:
        """Activation name -> its (QuantizeLinear, DequantizeLinear); converts (a pair reading another
        pair's output) are not primary. Graph outputs are keyed by their own name."""
        outputs = {t.name for t in graph.outputs}
        pairs = {}
        for node in graph.nodes:
            if node.op != "DequantizeLinear" or (pair := activation_qdq_pair(node.outputs[0])) is None:
                continue
            src = pair[0].inputs[0]
            if src.inputs and src.inputs[0].op == "DequantizeLinear":
                continue
            pairs[unrenamed(src.name, outputs)] = pair
        return pairs

    def _layer_tensors(self, graph: gs.Graph, pairs: dict) -> set[str]:
        """The activations the requested layers read and write (by their pairs)."""
        by_dq = {dq.name: name for name, (_, dq) in pairs.items()}
        by_src = {q.inputs[0].name: name for name, (q, _) in pairs.items()}
        nodes = {n.name: n for n in graph.nodes}
        out: set[str] = set()
        for name in self.layers:
            node = nodes.get(name)
            if node is None:  # not on the device: moved to the host graph, which stays float
                continue
            for t in node.inputs:
                if t.inputs and t.inputs[0].name in by_dq:
                    out.add(by_dq[t.inputs[0].name])
            out.update(by_src[t.name] for t in node.outputs if t.name in by_src)
        return out

    def _producer(self, pair: tuple[gs.Node, gs.Node]) -> gs.Node | None:
        src = pair[0].inputs[0]
        return src.inputs[0] if src.inputs else None

    def _readers(self, pair: tuple[gs.Node, gs.Node]) -> list[gs.Node]:
        return [c for c in pair[1].outputs[0].outputs if c.op not in QDQ]

    def _expand(self, wide: set[str], pairs: dict) -> set[str]:
        """Data-movement ops share their input's parameters: a wide tensor makes the tensors on both sides
        of such an op wide too."""
        by_dq = {dq.name: name for name, (_, dq) in pairs.items()}
        out_name = {q.inputs[0].name: name for name, (q, _) in pairs.items()}
        todo = list(wide)
        while todo:
            name = todo.pop()
            producer = self._producer(pairs[name])
            linked = []
            if producer is not None and producer.op in self.caps.same_scale_ops and producer.inputs[0].inputs:
                linked.append(by_dq.get(producer.inputs[0].inputs[0].name))
            for reader in self._readers(pairs[name]):
                if reader.op in self.caps.same_scale_ops:
                    linked += [out_name.get(t.name) for t in reader.outputs]
            for other in linked:
                if other is not None and other not in wide:
                    wide.add(other)
                    todo.append(other)
        return wide

    def _wide_ops(self, wide: set[str], pairs: dict) -> list[gs.Node]:
        ops: dict[str, gs.Node] = {}
        for name in wide:
            for op in (self._producer(pairs[name]), *self._readers(pairs[name])):
                if op is not None and op.op not in self.caps.same_scale_ops:
                    ops[op.name] = op
        return list(ops.values())

    def _storage(self, graph: gs.Graph, pairs: dict, wide: set[str], ops: list[gs.Node]) -> set[str]:
        """Activations stored at 16 bits: those computed by a wide op (or requested graph inputs), and
        outputs of data-movement ops reading a 16-bit tensor (in graph order)."""
        wide_ops = {op.name for op in ops}
        by_dq = {dq.name: name for name, (_, dq) in pairs.items()}
        stored: set[str] = set()
        for name in _graph_order(graph, pairs):
            producer = self._producer(pairs[name])
            if producer is None:
                wide_here = name in wide
            elif producer.op in self.caps.same_scale_ops:
                src = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
                wide_here = src is not None and by_dq.get(src.name) in stored
            else:
                wide_here = producer.name in wide_ops
            if wide_here:
                stored.add(name)
        return stored

    # --- rewriting -----------------------------------------------------------------------------------
    def _set_wide(self, q: gs.Node, dq: gs.Node, narrow: QParams, *, full_range: bool) -> None:
        """`full_range`: an op whose kernel fixes its output encoding (HTP's Sigmoid) writes the wide width's
        own fixed encoding, not the narrow grid split 257 ways."""
        qp = (widen_full_range if full_range else widen_qparams)(narrow.scale, narrow.zero_point, self.narrow,
                                                                 self.wide)
        base = dq.outputs[0].name
        scale = gs.Constant(f"{base}_scale_{self.wide.value}", qp.scale)
        zero = gs.Constant(f"{base}_zero_point_{self.wide.value}", qp.zero_point)
        for node in (q, dq):
            node.inputs[1], node.inputs[2] = scale, zero
        q.outputs[0].dtype = self.wide.numpy

    def _convert_readers(self, graph: gs.Graph, dq: gs.Node, is_wide: bool, narrow: QParams,
                         wide_ops: list[gs.Node], stored: set[str]) -> int:
        """Readers of another width than the tensor's storage read it through a Convert pair."""
        wide_names = {op.name for op in wide_ops}
        t = dq.outputs[0]
        made: gs.Variable | None = None
        for reader in [c for c in t.outputs if c.op not in QDQ]:
            if reader.op in self.caps.same_scale_ops:
                continue  # carries the tensor's own width
            if (reader.name in wide_names) == is_wide:
                continue
            if made is None:
                qp = narrow if is_wide else widen_qparams(narrow.scale, narrow.zero_point, self.narrow, self.wide)
                made = insert_qdq_pair(graph, t, qp, PASS_NAME)
            replace_input(reader, t, made)
        return int(made is not None)

    def _rescale_bias(self, op: gs.Node) -> None:
        """A wide op's inputs are on the 16-bit grid (scale / 257): its int32 bias, stored at s_input *
        s_weight, follows."""
        if op.op not in self.caps.bias_ops or len(op.inputs) < 3:
            return
        dq = op.inputs[2].inputs[0] if len(op.inputs[2].inputs) == 1 else None
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


def _qparams(dq: gs.Node) -> QParams:
    from qcompile.quant import QuantDType

    zero = np.asarray(constant_values(dq.inputs[2]))
    return QParams(np.asarray(constant_values(dq.inputs[1]), np.float32), zero, QuantDType(str(zero.dtype)))


def _graph_order(graph: gs.Graph, pairs: dict) -> list[str]:
    """Pair names in the order their QuantizeLinear nodes appear (the graph is sorted)."""
    by_q = {q.name: name for name, (q, _) in pairs.items()}
    return [by_q[n.name] for n in graph.nodes if n.name in by_q]
