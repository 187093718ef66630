"""Bias correction per timestep bucket: each quantized Conv/Gemm's mean output error per channel, measured
on calibration rows of the bucket, subtracted from its int32 bias.

Why: quantization error is not zero-mean. Rounding weights shifts each output channel by
(W_q - W) E[x], and the output grid's rounding adds its own offset; a sampler integrates such a shift
over every step. The correction is measured, not modelled: the bucket's quantized graph runs on the
runtime that evaluates the artifact (onnxruntime running the Q/DQ graph: the CPU EP for QNN, as the
build's evaluation does; for tflite-int8 the Q/DQ graph it is lowered from, which the LiteRT
interpreter matches within 1 LSB), and beside every quantized layer a float twin (the layer's float
weights and bias) reads the very same quantized inputs. The error is the layer's requantized output
(the DequantizeLinear after its QuantizeLinear) minus its twin's: the error the layer itself adds.
Correcting every layer at once against the float *model's* tensors instead counts upstream error
again at each layer downstream, and diverged on the reference model (mean error 0.6% -> 10% of the
output rms). The measurement is repeated `rounds` times so that each layer sees its inputs corrected.

The float weights come from the target's float device graph when it keeps one (QNN: the graph just
before Q/DQ insertion, fed by the host embedding), else from the canonical float graph (same node
names). Only int32 bias values move, by whole steps of s_in * s_w; weights and scales are unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompile.calibration.inputs import InputSet
from qcompile.graph_io import constant_values, copy_graph, save_graph
from qcompile.runtime import make_session, static_chunks
from qcompile.target import CompiledBucket

BIAS_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class Corrected:
    bucket: int
    layers: int  # layers whose bias moved
    rows: int
    mean_abs_shift_before: float  # mean |per-channel mean error| over corrected layers, relative to output rms
    mean_abs_shift_after: float

    def as_dict(self) -> dict[str, object]:
        return {"layers": self.layers, "rows": self.rows,
                "relative_mean_error_before": round(self.mean_abs_shift_before, 5),
                "relative_mean_error_after": round(self.mean_abs_shift_after, 5)}


@dataclass(frozen=True, eq=False)
class _Slot:
    node: gs.Node
    measured: str  # the layer's output as the runtime requantizes it (the DQ after its Q, else its output)
    weight: np.ndarray  # the float layer's weights and bias (from the float graph)
    bias: np.ndarray
    channel_axis: int


def _session(graph: gs.Graph, outputs: Sequence[str]) -> ort.InferenceSession:
    """A CPU session of a copy of `graph` whose outputs are `outputs` (saved to a scratch folder: the
    weights may still live in the float model's external data file)."""
    g = copy_graph(graph)
    tensors = g.tensors()
    g.outputs = [tensors[n] for n in outputs]
    for t in g.outputs:
        t.dtype = np.float32 if t.dtype is None else t.dtype
    with tempfile.TemporaryDirectory(prefix="qcompile-bias-") as tmp:
        path = save_graph(g, Path(tmp) / "model.onnx")
        return make_session(path)


def _run(session: ort.InferenceSession, rows: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
    """`outputs` on every row, in chunks of the graph's static batch (when it has one)."""
    inputs = session.get_inputs()
    batch = next((i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)), None)
    names = [i.name for i in inputs]
    key = next(k for k in names if rows[k].ndim)
    batched = {k for k in names if rows[k].ndim and len(rows[k]) == len(rows[key])}
    feed = {k: rows[k] for k in names}
    if batch is None:
        return session.run(list(outputs), feed)
    parts = [[o[:count] for o in session.run(list(outputs), chunk)] for chunk, count in static_chunks(feed, batch,
                                                                                                      batched)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def _device_rows(bucket: CompiledBucket, rows: InputSet) -> dict[str, np.ndarray]:
    """The device graph's inputs: the host graph (QNN's timestep embedding) run first when there is one."""
    feed = dict(rows.arrays)
    if bucket.host_graph is not None:
        host = bucket.host_graph
        outs = [t.name for t in host.outputs]
        session = _session(host, outs)
        feed.update(zip(outs, _run(session, feed, outs), strict=True))
    return {k: np.asarray(v, np.float32) if v.dtype == np.float64 else v for k, v in feed.items()}


def _int32_bias(node: gs.Node) -> gs.Node | None:
    """The DequantizeLinear feeding an int32 bias, if the node has one."""
    if len(node.inputs) < 3 or len(node.inputs[2].inputs) != 1:
        return None
    dq = node.inputs[2].inputs[0]
    if dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
        return None
    return dq if constant_values(dq.inputs[0]).dtype == np.int32 else None


def _slots(graph: gs.Graph, reference: gs.Graph) -> list[_Slot]:
    ref_nodes = {n.name: n for n in reference.nodes}
    out = []
    for node in graph.nodes:
        ref = ref_nodes.get(node.name)
        if node.op not in BIAS_OPS or _int32_bias(node) is None or ref is None or len(ref.inputs) < 3:
            continue
        weight, bias = constant_values(ref.inputs[1]), constant_values(ref.inputs[2])
        if weight is None or bias is None:
            continue
        y = node.outputs[0]
        measured = y.name
        q = next((c for c in y.outputs if c.op == "QuantizeLinear"), None)
        if q is not None:
            dq = next((c for c in q.outputs[0].outputs if c.op == "DequantizeLinear"), None)
            if dq is not None:
                measured = dq.outputs[0].name
        out.append(_Slot(node, measured, weight, bias, 1 if node.op == "Conv" else -1))
    return out


def _with_float_twins(graph: gs.Graph, slots: Sequence[_Slot]) -> tuple[gs.Graph, list[str]]:
    """A copy of the quantized graph in which each slot's layer also runs in float (its float weights and
    bias) on the very inputs the quantized layer reads: the difference is the error the layer itself
    adds, so correcting every layer at once counts no upstream error twice."""
    g = copy_graph(graph)
    nodes = {n.name: n for n in g.nodes}
    names = []
    for k, s in enumerate(slots):
        node = nodes[s.node.name]
        out = gs.Variable(f"bias_correction_float_{k}", dtype=np.float32)
        w = gs.Constant(f"bias_correction_w{k}", np.asarray(s.weight, np.float32))
        b = gs.Constant(f"bias_correction_b{k}", np.asarray(s.bias, np.float32))
        g.nodes.append(gs.Node(node.op, f"{node.name}_float_twin", dict(node.attrs), [node.inputs[0], w, b], [out]))
        names.append(out.name)
    return g, names


def _per_sample_channel_means(x: np.ndarray, axis: int) -> np.ndarray:
    """(samples, channels): each sample's mean per channel (a Gemm's rows count as samples)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)


def _significant(diff: np.ndarray, z: float) -> np.ndarray:
    """The mean per channel of per-sample differences, zero where it is within `z` standard errors of 0:
    a mean the rows cannot tell from rounding noise is noise, and folding it into the bias would add a
    systematic error of that size (it did, on the reference model, before this test)."""
    mean = diff.mean(axis=0)
    if len(diff) < 2:
        return mean
    stderr = diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
    return np.where(np.abs(mean) > z * stderr, mean, 0.0)


def correct_bucket(bucket: CompiledBucket, reference: gs.Graph, rows: InputSet, *, rounds: int = 2,
                   z: float = 3.0) -> Corrected:
    """Rewrite `bucket.graph`'s int32 biases in place. `reference`: the float graph whose nodes of the same
    names hold the float weights (the bucket's float device graph, or the canonical float graph)."""
    graph = bucket.graph
    slots = _slots(graph, reference)
    if not slots:
        return Corrected(bucket.index, 0, rows.count, 0.0, 0.0)
    feed = _device_rows(bucket, rows)
    before = after = 0.0
    for k in range(rounds + 1):
        g, twins = _with_float_twins(graph, slots)
        measured = [s.measured for s in slots]
        outs = _run(_session(g, [*measured, *twins]), feed, [*measured, *twins])
        got, want = outs[:len(slots)], outs[len(slots):]
        diffs = [_per_sample_channel_means(q, s.channel_axis) - _per_sample_channel_means(f, s.channel_axis)
                 for q, f, s in zip(got, want, slots, strict=True)]
        errors = [d.mean(axis=0) for d in diffs]
        rms = [float(np.sqrt(np.mean(np.square(f, dtype=np.float64)))) or 1.0 for f in want]
        level = float(np.mean([np.abs(e).mean() / r for e, r in zip(errors, rms, strict=True)]))
        if k == 0:
            before = level
        after = level
        if k == rounds:
            break
        for s, d in zip(slots, diffs, strict=True):
            _shift_bias(s.node, _significant(d, z), bucket.index)
    return Corrected(bucket.index, len(slots), rows.count, before, after)


def _shift_bias(node: gs.Node, error: np.ndarray, bucket: int) -> None:
    """Subtract `error` (per output channel, float) from the node's int32 bias, in whole steps of its scale."""
    dq = _int32_bias(node)
    values = constant_values(dq.inputs[0]).astype(np.int64)
    scale = np.broadcast_to(np.asarray(constant_values(dq.inputs[1]), np.float64), values.shape)
    shifted = values - np.round(error / scale).astype(np.int64)
    info = np.iinfo(np.int32)
    shifted = np.clip(shifted, info.min, info.max).astype(np.int32)
    base = dq.inputs[0].name.split("_bc")[0]
    dq.inputs[0] = gs.Constant(f"{base}_bc{bucket}", shifted)
