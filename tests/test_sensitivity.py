import numpy as np
from graphs import conv_mlp_model, manifest_for, save_with_external_data

from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import record_input_set
from qcompile.calibration.stats import collect_stats
from qcompile.config import Estimator
from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.sensitivity import LayerSensitivity, choose_float_layers, mixed_precision
from qcompile.targets.ort_int8.target import OrtInt8Target


def _setup(tmp_path):
    graph = load_graph(save_with_external_data(conv_mlp_model(seed=4), tmp_path / "raw.onnx"))
    PassManager(canonicalize_passes(), fixed_point=True).run(graph, PassContext())
    path = save_graph(graph, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    inputs = InputSet({"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}, None)
    table = collect_stats(path, load_graph(path), record_input_set(inputs, tmp_path / "rec", {}))
    return path, estimate_ranges(table, Estimator.MAX), inputs


def test_mixed_precision_reaches_the_requested_sqnr_with_few_float_layers(tmp_path):
    path, ranges, inputs = _setup(tmp_path)
    target = OrtInt8Target()
    template = manifest_for([], [])
    full = mixed_precision(load_graph(path), path, target, ranges, inputs, (), timestep_input=None, template=template,
                           folder=tmp_path / "probes", target_sqnr_db=None, max_float=0)
    assert full.float_layers == () and [s.node for s in sorted(full.ranking, key=lambda s: s.node)] == \
        ["conv1", "conv2", "fc"]
    assert all(a.sqnr_db <= b.sqnr_db for a, b in zip(full.ranking, full.ranking[1:], strict=False))
    # Each layer alone loses less than all of them together.
    assert full.all_quantized_sqnr_db < min(s.sqnr_db for s in full.ranking)
    goal = full.all_quantized_sqnr_db + 3.0
    mixed = mixed_precision(load_graph(path), path, target, ranges, inputs, (), timestep_input=None,
                            template=template, folder=tmp_path / "probes", target_sqnr_db=goal, max_float=3)
    assert mixed.sqnr_db >= goal and 1 <= len(mixed.float_layers) < 3
    assert mixed.float_layers[0] == mixed.ranking[0].node  # the most sensitive goes first


def test_bisection_finds_the_fewest_layers():
    ranking = [LayerSensitivity(f"n{i}", "", "Conv", float(i)) for i in range(10)]
    calls = []

    def evaluate(names):
        calls.append(len(names))
        return 20.0 + len(names)  # each float layer adds 1 dB

    chosen, reached = choose_float_layers(ranking, evaluate, target_sqnr_db=24.0, max_float=10)
    assert chosen == ("n0", "n1", "n2", "n3") and reached == 24.0
    assert len(calls) <= 5  # log2(10) probes plus the budget check
    chosen, reached = choose_float_layers(ranking, evaluate, target_sqnr_db=40.0, max_float=10)
    assert len(chosen) == 10 and reached == 30.0  # unreachable: the whole budget, honestly reported
