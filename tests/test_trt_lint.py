"""The TensorRT lint: a clean Q/DQ graph passes, and a graph breaking each rule on purpose is caught with
the node and the rule named; a violation fails the build in one line (UserError)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qcompile.errors import UserError
from qcompile.targets.tensorrt.lint import LintRules, Rule, check, lint

I8 = np.int8
F8 = ml_dtypes.float8_e4m3fn


def const(name, value, dtype=np.float32):
    return gs.Constant(name, np.asarray(value, dtype))


class G:
    """A tiny graph under construction: Q/DQ helpers that can break a rule on request."""

    def __init__(self, opset=20):
        self.nodes: list[gs.Node] = []
        self.opset = opset
        self.x = gs.Variable("x", np.float32, (1, 32, 8, 8))
        self.inputs = [self.x]

    def node(self, op, name, inputs, shape, dtype=np.float32, attrs=None):
        out = gs.Variable(f"{name}_out", dtype, shape)
        self.nodes.append(gs.Node(op, name, attrs or {}, inputs, [out]))
        return out

    def qdq(self, t, name, scale=0.05, zero=0, zdtype=I8, axis=None, shape=None):
        shape = shape or t.shape
        s = const(f"{name}_s", scale) if not isinstance(scale, gs.Tensor) else scale
        z = None if zdtype is None else const(f"{name}_z", np.full(np.shape(scale), zero), zdtype)
        ins = [t, s] + ([z] if z is not None else [])
        attrs = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", f"{name}_Q", ins, shape, zdtype or np.uint8, attrs)
        return self.node("DequantizeLinear", f"{name}_DQ", [q, *ins[1:]], shape, np.float32, attrs)

    def weight(self, name, cout, cin, axis=0, per_channel=True, dtype=I8):
        w = const(f"{name}_w", np.ones((cout, cin, 1, 1)), dtype)
        scale = np.full(cout if per_channel else (), 0.01, np.float32)
        z = const(f"{name}_wz", np.zeros(np.shape(scale)), dtype)
        attrs = {"axis": axis} if per_channel else {}
        return self.node("DequantizeLinear", f"{name}_wDQ", [w, const(f"{name}_ws", scale), z], (cout, cin, 1, 1),
                         attrs=attrs)

    def conv(self, name, data, cout=32, cin=32, **wkw):
        return self.node("Conv", name, [data, self.weight(name, cout, cin, **wkw)], (1, cout, 8, 8))

    def graph(self, out):
        return gs.Graph(nodes=self.nodes, inputs=self.inputs, outputs=[out], opset=self.opset)


def clean(g: G | None = None, **conv_kw):
    """x -> Q/DQ -> Conv -> Add(conv, Q/DQ(x)): a conv with its residual Add, as TensorRT fuses it."""
    g = g or G()
    xq = g.qdq(g.x, "x")
    y = g.conv("conv", xq, **conv_kw)
    return g, g.node("Add", "skip_add", [y, xq], (1, 32, 8, 8))


def rules_of(graph, **kw):
    return {(v.node, v.rule) for v in lint(graph, LintRules(**kw))}


def test_clean_graph_has_no_violation():
    g, out = clean()
    assert lint(g.graph(out), LintRules()) == []


def test_fp8_clean_graph_has_no_violation():
    g = G(opset=19)
    xq = g.qdq(g.x, "x", zdtype=F8)
    y = g.conv("conv", xq, dtype=F8)
    assert lint(g.graph(g.node("Add", "skip_add", [y, xq], (1, 32, 8, 8))), LintRules()) == []


@pytest.mark.parametrize("zero,zdtype,why", [(3, I8, "not a constant 0"), (128, np.uint8, "uint8"),
                                             (0, None, "no zero point")])
def test_symmetric(zero, zdtype, why):
    g = G()
    xq = g.qdq(g.x, "x", zero=zero, zdtype=zdtype)
    y = g.conv("conv", xq)
    found = lint(g.graph(g.node("Add", "a", [y, xq], (1, 32, 8, 8))), LintRules())
    assert any(v.rule is Rule.SYMMETRIC and v.node == "x_Q" and why in v.detail for v in found)


@pytest.mark.parametrize("scale", [0.0, np.inf, -0.1, "input"])
def test_constant_finite_positive_scale(scale):
    g = G()
    if scale == "input":
        scale = gs.Variable("s_in", np.float32, ())
        g.inputs.append(scale)
    xq = g.qdq(g.x, "x", scale=scale)
    y = g.conv("conv", xq)
    assert ("x_Q", Rule.CONSTANT_SCALE) in rules_of(g.graph(g.node("Add", "a", [y, xq], (1, 32, 8, 8))))


def test_fp8_needs_opset_19():
    g = G(opset=18)
    xq = g.qdq(g.x, "x", zdtype=F8)
    y = g.conv("conv", xq, dtype=F8)
    found = lint(g.graph(g.node("Add", "a", [y, xq], (1, 32, 8, 8))), LintRules())
    assert [v.rule for v in found] == [Rule.OPSET]


@pytest.mark.parametrize("kw", [{"per_channel": False}, {"axis": 1}])
def test_weight_per_output_channel(kw):
    g, out = clean(**kw)
    assert ("conv_wDQ", Rule.WEIGHT_PER_CHANNEL) in rules_of(g.graph(out))


def test_activation_per_tensor():
    g = G()
    xq = g.qdq(g.x, "x", scale=np.full(32, 0.05, np.float32), axis=1)
    y = g.conv("conv", xq)
    assert ("x_Q", Rule.ACTIVATION_PER_TENSOR) in rules_of(g.graph(g.node("Add", "a", [y, xq], (1, 32, 8, 8))))


def test_q_read_by_something_else_than_dq():
    g, out = clean()
    q_out = next(n for n in g.nodes if n.name == "x_Q").outputs[0]
    side = g.node("Cast", "peek", [q_out], (1, 32, 8, 8), attrs={"to": 1})
    graph = g.graph(out)
    graph.outputs.append(side)
    assert ("x_Q", Rule.Q_DQ_PAIR) in rules_of(graph)


def test_half_quantized_layer():
    g = G()
    y = g.conv("conv", g.x)  # float input, quantized weight
    assert ("conv", Rule.BOTH_INPUTS) in rules_of(g.graph(y))


def test_float_residual_input():
    g = G()
    y = g.conv("conv", g.qdq(g.x, "x"))
    out = g.node("Add", "skip_add", [y, g.x], (1, 32, 8, 8))  # the residual is float
    assert rules_of(g.graph(out)) == {("skip_add", Rule.RESIDUAL_ADD)}
    assert rules_of(g.graph(out), residual_adds=False) == set()


def test_residual_through_bias_add_is_recognised():
    g = G()
    y = g.conv("conv", g.qdq(g.x, "x"))
    biased = g.node("Add", "bias", [y, const("b", np.zeros((1, 32, 1, 1)))], (1, 32, 8, 8))
    out = g.node("Add", "skip_add", [biased, g.x], (1, 32, 8, 8))
    assert ("skip_add", Rule.RESIDUAL_ADD) in rules_of(g.graph(out))


def test_concat_inputs_share_one_scale():
    g = G()
    a, b = g.qdq(g.x, "a", scale=0.05), g.qdq(g.x, "b", scale=0.07)
    cat = g.node("Concat", "cat", [a, b], (1, 64, 8, 8), attrs={"axis": 1})
    assert rules_of(g.graph(cat)) == {("cat", Rule.CONCAT_SCALE)}
    g2 = G()
    same = g2.node("Concat", "cat", [g2.qdq(g2.x, "a"), g2.qdq(g2.x, "b")], (1, 64, 8, 8), attrs={"axis": 1})
    assert rules_of(g2.graph(same)) == set()
    g3 = G()
    half = g3.node("Concat", "cat", [g3.qdq(g3.x, "a"), g3.x], (1, 64, 8, 8), attrs={"axis": 1})
    assert rules_of(g3.graph(half)) == {("cat", Rule.CONCAT_SCALE)}


def test_narrow_layer_stays_float():
    g = G()
    y = g.conv("conv", g.qdq(g.x, "x"), cout=8)
    assert rules_of(g.graph(y)) == {("conv", Rule.NARROW_LAYER)}


def test_float_scope_layer_quantized():
    g, out = clean()
    assert rules_of(g.graph(out), float_scopes=(r"^conv$",)) == {("conv", Rule.FLOAT_LAYER)}
    assert rules_of(g.graph(out), float_layers=frozenset({"conv"})) == {("conv", Rule.FLOAT_LAYER)}


@pytest.mark.parametrize("head,expected", [(32, set()), (24, {("qk", Rule.ATTENTION_HEAD)})])
def test_attention_head_multiple_of_16(head, expected):
    g = G(opset=19)
    q = gs.Variable("q", np.float32, (1, 4, 64, head))
    k = gs.Variable("kT", np.float32, (1, 4, head, 64))
    g.inputs = [q, k]
    qq = g.qdq(q, "q", zdtype=F8)
    kq = g.qdq(k, "k", zdtype=F8)
    s = g.node("MatMul", "qk", [qq, kq], (1, 4, 64, 64))
    p = g.node("Softmax", "softmax", [s], (1, 4, 64, 64), attrs={"axis": -1})
    assert rules_of(g.graph(p)) == expected


def test_violation_fails_in_one_line():
    g = G()
    y = g.conv("conv", g.x)
    with pytest.raises(UserError) as err:
        check([("bucket 0", g.graph(y))], LintRules())
    assert "bucket 0: node 'conv' breaks rule both-inputs" in str(err.value)
    assert "\n" not in str(err.value)
