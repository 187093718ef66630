"""Mixed precision's sensitivity probes as Ray tasks over layers (local Ray, 2 CPUs): the reference model's
ranking, scores and chosen float layers are the one-machine run's exactly; a layer whose probe keeps
failing fails in one line naming it; `build --ray` without mixed precision is refused before any work."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from graphs import conv_mlp_model, manifest_for, save_with_external_data

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.estimators import estimate_ranges
from qcompile.calibration.inputs import InputSet
from qcompile.cli import main
from qcompile.config import Estimator, TargetName
from qcompile.errors import UserError
from qcompile.graph_io import load_graph
from qcompile.manifest import Manifest
from qcompile.sensitivity import Prober, mixed_precision, probe_each
from qcompile.sensitivity_ray import ray_probe_map
from qcompile.target import load_target

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qcompile[ray]')")
pytest.importorskip("qcompile.models.reference_model")

MODEL = "builtin:reference"
# The probes cover the reference's first two down blocks, time embedding and conv_in/out (25 of its
# 132 layers); the others would only make the test longer.
OUTSIDE = (r"^up_blocks\.", r"^mid_block\.", r"^down_blocks\.2\.")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-sensitivity")
    assert main(["export", MODEL, "--out", str(root / "export")]) == 0
    assert main(["calibrate", MODEL, "--from-export", str(root / "export"), "--calib", "sample:2", "--steps", "4",
                 "--calib-cache", str(root / "cache")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def _mixed(root: Path, probe_map, name: str):
    export, cache = root / "export", CalibrationCache.open(root / "cache")
    target = load_target(TargetName.ORT_INT8)
    caps = target.caps
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    ranges = estimate_ranges(cache.table(), Estimator.MAX, levels=levels, symmetric=caps.activation_symmetric)
    template = replace(Manifest.read(export), target="ort-int8", precision="w8a8")
    return mixed_precision(load_graph(export / "model.onnx"), export / "model.onnx", target, ranges,
                           cache.recording().spread_rows(8), OUTSIDE, timestep_input=template.model.timestep_input,
                           template=template, folder=root / name, target_sqnr_db=50.0, max_float=6,
                           probe_map=probe_map)


def _worker_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("qcompile-probes-*"))


def test_ray_probes_rank_and_choose_exactly_as_one_machine(reference):
    here = _mixed(reference, probe_each, "here")
    before = _worker_folders()
    on_ray = _mixed(reference, ray_probe_map(""), "on-ray")
    assert _worker_folders() == before  # each node's copy of the float graph is removed after the ranking
    assert len(here.ranking) == 25
    assert on_ray.ranking == here.ranking  # the same layers, in the same order, with the same SQNR (dB)
    assert on_ray.float_layers == here.float_layers
    assert 1 <= len(here.float_layers) < 6 and here.sqnr_db >= 50.0  # found by bisection, within the budget
    assert (on_ray.sqnr_db, on_ray.all_quantized_sqnr_db) == (here.sqnr_db, here.all_quantized_sqnr_db)
    assert not list(reference.glob("on-ray*")) and not list(reference.glob("here*"))


def test_a_layer_whose_probe_keeps_failing_fails_naming_it(reference, tmp_path):
    path = save_with_external_data(conv_mlp_model(seed=4), tmp_path / "m.onnx")
    wrong = InputSet({"not_x": np.zeros((2, 3, 8, 8), np.float32)}, None)  # the graph's input is x
    prober = Prober(load_graph(path), None, load_target(TargetName.ORT_INT8), {}, wrong, (), timestep_input=None,
                    template=manifest_for([], []), folder=tmp_path / "probes", expected=np.zeros((2, 10), np.float32))
    before = _worker_folders()
    with pytest.raises(UserError, match=r"^--ray: the sensitivity probe of layer '[^']+' failed 3 times \("):
        ray_probe_map("")(prober, ["conv1", "conv2", "fc"])
    assert _worker_folders() == before


def test_build_ray_without_mixed_precision_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", "builtin:tiny-unet2d", "--ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error: --ray: ") and "--mixed-precision" in err[0], err
    assert not out.exists()
