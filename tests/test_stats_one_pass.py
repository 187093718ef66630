"""The statistics pass runs the model once per batch, segment by segment, and gives exactly the
statistics of replaying the whole model once per group of exposed tensors (the earlier pass)."""

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set, record_sampling
from qcompile.calibration.segments import FOLDED_INTO_MATMUL, node_reads, plan_segments, segmented
from qcompile.calibration.shapes import concrete_shapes
from qcompile.calibration.stats import (
    EXPOSED_BYTES_BUDGET,
    StatsTable,
    TensorStats,
    _channels,
    _key,
    channel_axis,
    collect_stats,
    expose_tensors,
    observed_row_bytes,
    quantizable_tensors,
)
from qcompile.config import SamplerSettings, SchedulerKind
from qcompile.graph_io import load_graph
from qcompile.pass_manager import PassContext
from qcompile.runtime import OnnxRunner, make_session
from qcompile.stages import export_canonical

pytest.importorskip("qcompile.models.reference_model")
BATCH = 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from qcompile.models.source import resolve_model

    adapter = resolve_model("builtin:reference")
    tmp = tmp_path_factory.mktemp("ref")
    exported = export_canonical(adapter, tmp, opset=20, ctx=PassContext())
    runner = OnnxRunner([exported.path], timestep_name="timestep", sample_name="sample")
    settings = SamplerSettings(scheduler=SchedulerKind.DDIM, steps=4, guidance=3.0, seed=7)
    recording = record_sampling(runner.run, adapter.sampling(), settings, 6, tmp / "rec", sample_name="sample",
                                timestep_name="timestep", source={})
    return exported.path, load_graph(exported.path), recording


def grouped_replay(onnx_path, graph, recording, names, budget):
    """The earlier statistics pass: the names exposed as extra outputs of the whole model a group at a
    time (each group's bytes for one batch within `budget`), the recording replayed once per group."""
    tensors = graph.tensors()
    timesteps = recording.timesteps()
    t_index = {float(t): i for i, t in enumerate(_key(timesteps))}
    table = {n: TensorStats.empty(len(timesteps), _channels(tensors[n], channel_axis(tensors[n])),
                                  channel_axis(tensors[n])) for n in names}
    groups, used = [[]], 0
    row_bytes = observed_row_bytes(onnx_path, recording, names)
    for n in names:
        size = row_bytes[n] * BATCH
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    for group in groups:
        exposed = expose_tensors(onnx_path, group)
        sess = make_session(exposed)
        for inputs, meta in recording.shards():
            keys = _key(meta.timestep)
            for t in np.unique(keys):
                rows = np.nonzero(keys == t)[0]
                for start in range(0, len(rows), BATCH):
                    values = sess.run(group, inputs.take(rows[start:start + BATCH]))
                    for name, v in zip(group, values, strict=True):
                        table[name].observe(t_index[float(t)], np.asarray(v, np.float32))
        exposed.unlink()
    return StatsTable(timesteps, table), len(groups)


def assert_same_tables(a: StatsTable, b: StatsTable):
    np.testing.assert_array_equal(a.timesteps, b.timesteps)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.channel_axis == y.channel_axis, name
        for field in ("count", "lo", "hi", "chan_absmax", "hist"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{name}.{field}")


def test_one_pass_gives_the_grouped_replays_statistics_and_cache(reference, tmp_path):
    """The earlier pass at its default budget (the whole reference model in one group) against the new
    pass at that budget and at budgets cutting the model into 6 and 30 segments: identical arrays.

    (The earlier pass was itself not invariant to its budget: a group that does not expose a tensor lets
    onnxruntime fuse the node computing it, which moves some statistics by an ulp. Segments expose
    every observed tensor, so the cut does not matter.)"""
    path, graph, recording = reference
    names = quantizable_tensors(graph)
    old, groups = grouped_replay(path, graph, recording, names, EXPOSED_BYTES_BUDGET)
    assert groups == 1
    row_bytes = observed_row_bytes(path, recording, names)
    total = sum(row_bytes[n] * BATCH for n in names)
    new = collect_stats(path, graph, recording)
    assert_same_tables(old, new)
    for parts in (6, 30):
        model = onnx.load(str(path), load_external_data=False)
        cut = plan_segments(model.graph, names, lambda n: row_bytes[n] * BATCH, total // parts)
        assert len(cut) >= parts
        assert_same_tables(old, collect_stats(path, graph, recording, batch=BATCH, budget_bytes=total // parts))
    # The caches written from either hold the same arrays under the same keys.
    caches = [CalibrationCache.create(tmp_path / name, graph_fingerprint="g", recording=recording, table=table,
                                      source={}) for name, table in (("old", old), ("new", new))]
    assert_same_tables(caches[0].table(), caches[1].table())
    with np.load(caches[0].folder / "stats.npz") as a, np.load(caches[1].folder / "stats.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not list(path.parent.glob(".*segment*.onnx"))  # segment files are gone once sessions exist


def test_segments_cover_every_node_once_within_the_budget_and_carry_only_what_is_read_later(reference):
    path, graph, recording = reference
    model = onnx.load(str(path), load_external_data=False)
    names = quantizable_tensors(graph)
    sizes = {n: b * BATCH for n, b in observed_row_bytes(path, recording, names).items()}
    budget = sum(sizes.values()) // 10
    segments = plan_segments(model.graph, names, sizes.get, budget)
    assert len(segments) >= 10
    placed = Counter(n.name for s in segments for n in s.nodes if n.op_type != "Constant")
    assert set(placed) == {n.name for n in model.graph.node if n.op_type != "Constant"}
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[n] for n, times in placed.items() if times > 1} <= FOLDED_INTO_MATMUL  # recomputed: cheap
    observed = [n for s in segments for n in s.observed]
    assert sorted(observed) == sorted(names)  # every name once
    for s in segments:
        made = {o for n in s.nodes for o in n.output}
        assert sum(sizes[n] for n in s.observed if n in made) <= budget or len(s.nodes) == 1
    # What crosses each cut is exactly what a later segment reads.
    fixed = {i.name for i in model.graph.initializer}
    alive = {i.name for i in model.graph.input}
    made = set(alive)
    for k, s in enumerate(segments):
        assert set(s.inputs) <= alive
        alive = (alive - set(s.release)) | set(s.carried)
        made |= {o for n in s.nodes for o in n.output}
        later = set().union(*[{r for n in t.nodes for r in node_reads(n)} - {o for n in t.nodes for o in n.output}
                              for t in segments[k + 1:]]) & made - fixed
        assert alive == later, k
    assert not alive


def test_segment_models_share_the_weight_file(reference):
    """No segment copies a weight: every large initializer still points into the model's data file."""
    path, graph, _ = reference
    names = quantizable_tensors(graph)
    with segmented(path, names, lambda n: 1, budget=math.inf) as model:
        assert len(model.segments) == 1
    model = onnx.load(str(path), load_external_data=False)
    segments = plan_segments(model.graph, names, lambda n: 1, budget=len(names) // 4)
    external = {i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert external
    from qcompile.calibration.segments import segment_model

    info = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    seen = set()
    for s in segments:
        proto = segment_model(model, s, info, [])
        for init in proto.graph.initializer:
            if init.name in external:
                assert init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data
                seen.add(init.name)
    assert seen == external


def scaled_attention(path, dim=40, infer=True):
    """Attention scores as exporters write scaled_dot_product_attention: q and k^T each scaled by
    dim**-0.25 before their MatMul. onnxruntime folds both scales into the MatMul (FusedMatMul alpha),
    which rounds differently from scaling first; a cut between a scale and its MatMul must not undo that."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), n) for n in ("wq", "wk")]
    inits.append(numpy_helper.from_array(np.array(dim ** -0.25, np.float32), "s"))
    nodes = [helper.make_node("MatMul", ["q", "wq"], ["qp"]), helper.make_node("MatMul", ["k", "wk"], ["kp"]),
             helper.make_node("Transpose", ["kp"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("Mul", ["qp", "s"], ["qs"]), helper.make_node("Mul", ["kt", "s"], ["ks"]),
             helper.make_node("MatMul", ["qs", "ks"], ["scores"]), helper.make_node("Softmax", ["scores"], ["p"]),
             helper.make_node("MatMul", ["p", "kp"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 16, dim]) for n in ("q", "k", "y")]
    graph = helper.make_graph(nodes, "attention", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.save(onnx.shape_inference.infer_shapes(model) if infer else model, str(path))
    return path


@pytest.mark.parametrize("budget", [1, 16 * 40 * 4 * BATCH * 3])
def test_a_cut_between_a_scale_and_its_matmul_changes_no_statistic(tmp_path, budget):
    path = scaled_attention(tmp_path / "attention.onnx")
    rng = np.random.default_rng(1)
    inputs = InputSet({n: rng.standard_normal((6, 16, 40)).astype(np.float32) for n in ("q", "k")}, None)
    recording = record_input_set(inputs, tmp_path / "rec", {})
    graph = load_graph(path)
    names = quantizable_tensors(graph)
    whole, _ = grouped_replay(path, graph, recording, names, 1 << 40)
    assert len(names) == 10
    cut = plan_segments(onnx.load(str(path)).graph, names, lambda n: 16 * 40 * 4 * BATCH, budget)
    assert len(cut) >= 3
    assert_same_tables(whole, collect_stats(path, graph, recording, batch=BATCH, budget_bytes=budget))


def test_a_graph_without_value_info_is_cut_with_inferred_types(tmp_path):
    path = scaled_attention(tmp_path / "attention.onnx", infer=False)
    rng = np.random.default_rng(2)
    inputs = InputSet({n: rng.standard_normal((3, 16, 40)).astype(np.float32) for n in ("q", "k")}, None)
    recording = record_input_set(inputs, tmp_path / "rec", {})
    graph = load_graph(path)
    names = ["qp", "kp", "scores", "p", "y"]
    whole, _ = grouped_replay(path, graph, recording, names, 1 << 40)
    assert_same_tables(whole, collect_stats(path, graph, recording, names=names, budget_bytes=1))


@pytest.mark.parametrize("how", ["symbolic inference", "expressions alone"])
def test_observed_sizes_are_the_sizes_onnxruntime_computes(reference, how, monkeypatch):
    """The export has symbolic latent and prompt axes; the sizes the cut is planned with are the ones a
    recorded row really produces (every observed tensor exposed in one run of one row): exact for every
    tensor whose shape resolves, never below the truth for the few that do not (attention's
    batch*heads reshapes). The same holds where onnxruntime's symbolic inference cannot run and the
    exported dims are evaluated as expressions alone."""
    from qcompile.calibration import shapes as shapes_module

    if how == "expressions alone":
        monkeypatch.setattr(shapes_module, "_ort_symbolic", lambda pinned: {})
    path, graph, recording = reference
    names = quantizable_tensors(graph)
    declared = {n: graph.tensors()[n].shape for n in names}
    assert sum(any(not isinstance(d, int) for d in (s or [None])) for s in declared.values()) > len(names) // 2
    inputs, _ = next(recording.shards())
    shapes = concrete_shapes(onnx.load(str(path), load_external_data=False), inputs.row_shapes(), names)
    predicted = observed_row_bytes(path, recording, names)
    exposed = expose_tensors(path, names)
    values = make_session(exposed).run(names, inputs.take(slice(0, 1)))
    exposed.unlink()
    actual = {n: v for n, v in zip(names, values, strict=True)}
    unresolved = [n for n in names if shapes[n] is None]
    assert len(unresolved) <= len(names) // 10, unresolved
    wrong = {n: (shapes[n], actual[n].shape) for n in names if shapes[n] is not None and shapes[n] != actual[n].shape}
    assert not wrong, list(wrong.items())[:5]
    assert all(predicted[n] == 4 * actual[n].size for n in names if shapes[n] is not None)
    assert all(predicted[n] >= 4 * actual[n].size for n in unresolved)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_sizes_of_every_tensor_of_a_symbolic_unet_export(exporter, tmp_path):
    """Both exporters keep latent size and prompt length symbolic; the legacy one computes attention's
    reshapes through Shape -> Gather -> Div chains ONNX's own inference cannot follow. Every tensor's
    size still comes out exactly as onnxruntime computes it, at a size other than the export's."""
    from qcompile.export import export_onnx
    from qcompile.models.source import resolve_model

    adapter = resolve_model("builtin:tiny-sd-unet")
    path = export_onnx(adapter, tmp_path / "model.onnx", exporters=(exporter,)).onnx_path
    graph = load_graph(path)
    names = quantizable_tensors(graph)
    feeds = adapter.dummy_inputs(batch=1, seed=0, sizes={a.name: a.alternative() for axes in
                                                           adapter.input_axes().values() for a in axes
                                                           if a.dynamic and a.name != "batch"})
    shapes = concrete_shapes(onnx.load(str(path), load_external_data=False),
                             {k: v.shape for k, v in feeds.items()}, names)
    exposed = expose_tensors(path, names)
    values = make_session(exposed).run(names, feeds)
    exposed.unlink()
    wrong = {n: (shapes[n], v.shape) for n, v in zip(names, values, strict=True) if shapes[n] != v.shape}
    assert not wrong, (len(wrong), list(wrong.items())[:5])
