"""The reference model's ort-int8 artifact is dynamic: built at its own size, it runs at another batch
and another latent size, close to its float model there."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.calibration.inputs import spread_timesteps
from qcompile.cli import main
from qcompile.config import TargetName
from qcompile.evaluation.metrics import sqnr_db
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.runtime import OnnxRunner
from qcompile.target import load_target


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "artifact"
    code = main(["build", "builtin:reference", "--out", str(out), "--calib", "synthetic:16", "--steps", "4",
                 "--per-class", "1"])
    assert code in (0, 1)  # the sampling thresholds are not what this file tests
    return out if code == 0 else out.with_name(out.name + ".failed")


def _inputs(adapter, batch: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Noised smooth latents at `size` with real label embeddings, at timesteps spread over the schedule."""
    from qcompile.models.common import noise_ddpm, smooth_latent

    rng = np.random.default_rng(seed)
    t = spread_timesteps(batch, adapter.timestep_scale, seed)
    x0 = smooth_latent(rng, (batch, 1, size, size))
    labels = rng.integers(0, 10, batch)
    return {"sample": noise_ddpm(x0, t, rng, adapter.schedule), "timestep": t,
            "encoder_hidden_states": adapter.sampling().conditioning(labels)}


def test_runs_at_another_batch_and_size(artifact):
    manifest = Manifest.read(artifact)
    axes = {i.name: i.axes for i in manifest.model.inputs}
    assert [a["name"] for a in axes["sample"]] == ["batch", "sample.1", "height", "width"]
    assert axes["sample"][2]["dynamic"] and axes["sample"][2]["multiple"] == 4
    adapter = resolve_model("builtin:reference")
    runner = load_target(TargetName.ORT_INT8).runner(artifact, manifest)
    reference = OnnxRunner([manifest.fp32_path(artifact)], timestep_name="timestep", sample_name="sample")
    results = {}
    for batch, size in ((2, 16), (5, 16), (3, 24)):
        feeds = _inputs(adapter, batch, size, seed=batch * 100 + size)
        got, want = runner.run(feeds), reference.run(feeds)
        assert got.shape == want.shape == (batch, 1, size, size)
        results[(batch, size)] = sqnr_db(want, got)
    print(json.dumps({f"batch {b}, {s}x{s}": round(v, 2) for (b, s), v in results.items()}))
    # the artifact's own size and another: the same quality within a few dB (measured: see the print)
    assert min(results.values()) > 20.0
    assert abs(results[(3, 24)] - results[(2, 16)]) < 6.0
