"""Timestep-keyed calibration on the trained reference model (real activations, real samplers)."""

import numpy as np
import pytest

from qcompile.calibration.recorder import CFG_COND, CFG_UNCOND, record_sampling
from qcompile.calibration.stats import collect_stats
from qcompile.config import SamplerSettings, SchedulerKind
from qcompile.evaluation.sampling import make_scheduler
from qcompile.graph_io import load_graph
from qcompile.pass_manager import PassContext
from qcompile.runtime import OnnxRunner
from qcompile.stages import export_canonical

pytest.importorskip("qcompile.models.reference_model")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from qcompile.models.source import resolve_model

    adapter = resolve_model("builtin:reference")
    exported = export_canonical(adapter, tmp_path_factory.mktemp("ref"), opset=20, ctx=PassContext())
    return adapter, exported.path, load_graph(exported.path)


def _record(reference, tmp_path, kind, steps=10, count=20):
    adapter, fp32, graph = reference
    runner = OnnxRunner([fp32], timestep_name="timestep", sample_name="sample")
    settings = SamplerSettings(scheduler=kind, steps=steps, guidance=3.0, seed=7)
    return record_sampling(runner.run, adapter.sampling(), settings, count, tmp_path / kind.value,
                           sample_name="sample", timestep_name="timestep", source={})


def test_recording_is_keyed_by_timestep_value_with_cfg_halves(reference, tmp_path):
    rec = _record(reference, tmp_path, SchedulerKind.EULER, steps=6, count=4)
    scheduler = make_scheduler(SchedulerKind.EULER, reference[0].sampling().scheduler_config)
    scheduler.set_timesteps(6)
    # Euler's timesteps are fractional values, not indices: the recording keeps them exactly.
    np.testing.assert_allclose(np.sort(rec.timesteps()), np.sort(scheduler.timesteps.numpy()), rtol=1e-6)
    (inputs, meta), = list(rec.shards())
    assert len(meta.timestep) == 6 * 2 * 4  # steps x CFG halves x samples
    halves = meta.cfg_half[meta.call == 0]
    assert list(halves) == [CFG_UNCOND] * 4 + [CFG_COND] * 4
    # The uncond half carries the null label's embedding, the same for every row.
    cond = inputs.arrays["encoder_hidden_states"][meta.call == 0]
    np.testing.assert_array_equal(cond[0], cond[3])
    assert not np.array_equal(cond[4], cond[0])


def test_ddim_and_dpm_solver_give_the_same_statistics_at_shared_timesteps(reference, tmp_path):
    _, fp32, graph = reference
    names = [t for t in graph.tensors() if t in {n.outputs[0].name for n in graph.nodes if n.op == "Conv"}]
    tables = {}
    for kind in (SchedulerKind.DDIM, SchedulerKind.DPMPP_2M):
        tables[kind] = collect_stats(fp32, graph, _record(reference, tmp_path, kind), names=names)
    ddim, dpm = tables[SchedulerKind.DDIM], tables[SchedulerKind.DPMPP_2M]
    shared = np.intersect1d(ddim.timesteps, dpm.timesteps)
    assert len(shared) >= 5
    ratios = []
    for t in shared:
        i, j = int(np.nonzero(ddim.timesteps == t)[0][0]), int(np.nonzero(dpm.timesteps == t)[0][0])
        for name in names:
            a = max(abs(ddim.tensors[name].lo[i]), ddim.tensors[name].hi[i])
            b = max(abs(dpm.tensors[name].lo[j]), dpm.tensors[name].hi[j])
            ratios.append(abs(np.log(a / b)))
        if t == shared.max():  # the first call sees the same noise in both: identical statistics
            for name in names:
                np.testing.assert_array_equal(ddim.tensors[name].hist[i], dpm.tensors[name].hist[j])
    # Elsewhere the trajectories differ slightly, the per-timestep ranges do not.
    assert np.median(ratios) < 0.05 and np.percentile(ratios, 95) < 0.2, (np.median(ratios), np.max(ratios))
