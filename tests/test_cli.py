"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

import json

import numpy as np
import pytest

from qcompile.cli import main

TINY = "builtin:tiny-sd-unet"
REPORT_KEYS = {"target", "precision", "buckets", "runtime", "per_step", "summary", "thresholds", "passed"}
SUMMARY_KEYS = {"eps_sqnr_db_min", "eps_sqnr_db_mean", "sample_psnr_db", "sample_ssim", "size_bytes",
                "fp32_size_bytes"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "artifact"
    code = main(["build", TINY, "--out", str(out), "--calib", "synthetic:12", "--validate", "6"])
    return code, out


def test_build_writes_the_artifact_contract(built):
    code, out = built
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert report.keys() >= REPORT_KEYS and report["summary"].keys() >= SUMMARY_KEYS
    assert report["runtime"]["name"] == "onnxruntime" and report["passed"]
    assert len(report["per_step"]) == 6
    assert {"timestep", "bucket", "eps_sqnr_db", "eps_cos", "cfg_gap_ratio"} <= report["per_step"][0].keys()
    # Quantized well: these are measured numbers with margin, not "it ran".
    assert report["summary"]["eps_sqnr_db_mean"] > 20.0
    assert min(s["eps_cos"] for s in report["per_step"]) > 0.99
    # int8 weights: the artifact is well under half the fp32 size.
    assert report["summary"]["size_bytes"] < 0.45 * report["summary"]["fp32_size_bytes"]
    assert manifest["export"]["exporter"] in ("dynamo", "legacy")
    assert manifest["export"]["max_abs_diff_vs_torch"] <= 1e-4
    assert manifest["buckets"][0]["files"] == ["model.onnx", "model.onnx.data"]
    assert all((out / f).is_file() for f in manifest["buckets"][0]["files"])
    assert manifest["quantization"]["float_layers"]  # the family's default float layers
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_eval_rewrites_the_report_of_an_artifact(built, capsys):
    _, out = built
    before = json.loads((out / "report.json").read_text())
    assert main(["eval", str(out), "--validate", "3"]) == 0
    after = json.loads((out / "report.json").read_text())
    assert len(after["per_step"]) == 3 and after["summary"]["eps_sqnr_db_mean"] > 20.0
    assert after["summary"]["size_bytes"] == before["summary"]["size_bytes"]
    assert main(["eval", str(out), "--min-sqnr-db", "200"]) == 1  # a missed threshold is exit 1
    assert "threshold missed eps_sqnr_db_mean" in capsys.readouterr().out


def test_inspect_reads_artifact_and_onnx(built, capsys):
    _, out = built
    assert main(["inspect", str(out)]) == 0
    assert "target ort-int8" in capsys.readouterr().out
    assert main(["inspect", str(out / "model.onnx")]) == 0
    text = capsys.readouterr().out
    assert "QuantizeLinear" in text and "INT8" in text


def test_rebuild_replaces_a_previous_artifact_and_npz_calibration(built, tmp_path):
    from qcompile.calibration.inputs import synthetic_inputs
    from qcompile.models.source import resolve_model

    _, out = built
    adapter = resolve_model(TINY)
    calib = synthetic_inputs(adapter, 8, seed=3)
    npz = tmp_path / "calib.npz"
    np.savez(npz, **calib.arrays)
    code = main(["build", TINY, "--out", str(out), "--calib", str(npz), "--validate", "4"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["spec"] == str(npz) and manifest["calibration"]["rows"] == 6


def _bad(capsys, args, tmp_path, match):
    out = tmp_path / "out"
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("args,match", [
    (["build", "/no/such/folder"], "/no/such/folder"),
    (["build", TINY, "--target", "gpu-int3"], "--target gpu-int3"),
    (["build", TINY, "--calib", "synthetic:0"], "at least one sample"),
    (["build", TINY, "--calib", "missing.npz"], "missing.npz"),
    (["build", "builtin:no-such-model"], "builtin:no-such-model"),
    (["build", TINY, "--buckets", "0"], "--buckets"),
    (["build", TINY, "--calib", "prompts:/no/prompts.txt"], "no such prompts file"),
    (["build", TINY, "--smoothquant", "1.5"], "--smoothquant 1.5: alpha must be within"),
    (["build", TINY, "--static-batch", "2"], "--static-batch: target ort-int8 does not take it"),
    (["build", TINY, "--htp-arch", "75"],
     "--htp-arch: target ort-int8 does not take it; the option is for qnn-w8a8, qnn-w8a16"),
    (["build", TINY, "--target", "qnn-w8a8", "--htp-arch", "77"], "--htp-arch 77: not an HTP architecture the QNN"),
    (["build", TINY, "--target", "tflite-int8", "--static-batch", "0"], "--static-batch 0"),
    (["build", TINY, "--nonsense"], "unrecognized arguments"),
    (["build", "builtin:reference", "--guidance", "nan"], "--guidance nan: needs a finite number"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, match):
    _bad(capsys, args, tmp_path, match)


def test_folders_that_are_not_models(capsys, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    _bad(capsys, ["build", str(plain)], tmp_path, "plain")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"_class_name": "NotADiffusersModel"}))
    _bad(capsys, ["build", str(odd)], tmp_path, "NotADiffusersModel")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    _bad(capsys, ["build", str(listed)], tmp_path, "config.json: holds a JSON list")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    _bad(capsys, ["build", str(pipe), "--component", "feature_extractor"], tmp_path, "feature_extractor")


def test_out_folder_with_user_files_is_never_clobbered(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main(["build", TINY, "--out", str(out)])
    assert code == 2 and "not a qcompile artifact" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_calibration_cache_reused_across_builds_and_refused_for_another_graph(capsys, tmp_path):
    cache = tmp_path / "cache"
    assert main(["calibrate", TINY, "--calib-cache", str(cache), "--calib", "synthetic:8"]) == 0
    assert "calibration cache" in capsys.readouterr().out
    out = tmp_path / "k2"
    assert main(["build", TINY, "--out", str(out), "--calib-cache", str(cache), "--buckets", "2",
                 "--estimator", "percentile", "--validate", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["summary"]["calibration_reused"] is True
    assert [b["files"] for b in manifest["buckets"]] == [["model_t0.onnx", "model.data"],
                                                          ["model_t1.onnx", "model.data"]]
    lo, hi = (b["timestep_range"] for b in manifest["buckets"])
    assert lo[0] == 0.0 and lo[1] == hi[0] and hi[1] == 1000.0
    # Weights are stored once: the shared data file holds one copy of the int8 weights.
    assert (out / "model.data").stat().st_size < 0.3 * (out / "fp32" / "model.onnx.data").stat().st_size
    assert main(["inspect", str(cache)]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    code = main(["build", "builtin:tiny-unet2d", "--out", str(other), "--calib-cache", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "made for another graph" in err and len(err.splitlines()) == 1
    assert not other.exists()


def test_bucket_runner_routes_each_timestep_to_its_model(tmp_path):
    from qcompile.manifest import Manifest
    from qcompile.runtime import OnnxRunner
    from qcompile.targets.ort_int8.target import OrtInt8Target

    out = tmp_path / "k3"
    assert main(["build", TINY, "--out", str(out), "--calib", "synthetic:12", "--buckets", "3",
                 "--bucket-method", "uniform", "--validate", "4"]) == 0
    manifest = Manifest.read(out)
    runner = OrtInt8Target().runner(out, manifest)
    rng = np.random.default_rng(0)
    t = np.array([5.0, 500.0, 990.0, 6.0], np.float32)
    feed = {"sample": rng.standard_normal((4, 4, 16, 16)).astype(np.float32), "timestep": t,
            "encoder_hidden_states": rng.standard_normal((4, 77, 32)).astype(np.float32)}
    mixed = runner.run(feed)
    for i, ti in enumerate(t):
        b = runner.bucket_of(float(ti))
        lo, hi = manifest.buckets[b].timestep_range
        assert lo <= ti < hi
        alone = OnnxRunner([out / manifest.buckets[b].files[0]])
        np.testing.assert_array_equal(mixed[i], alone.run({k: v[i:i + 1] for k, v in feed.items()})[0])


def test_fewer_buckets_than_asked_is_warned_and_recorded(tmp_path, capsys):
    """A model without a timestep gets one bucket whatever --buckets says: the log warns and the
    manifest and report keep what was asked next to what was built."""
    from qcompile.manifest import Manifest

    out = tmp_path / "vae"
    assert main(["build", "builtin:tiny-vae-decoder", "--out", str(out), "--calib", "synthetic:4", "--buckets", "4",
                 "--validate", "2"]) == 0
    printed = capsys.readouterr().out
    assert "warning: --buckets 4: 1 bucket(s) built, the model has no timestep input" in printed
    manifest = Manifest.read(out)
    assert len(manifest.buckets) == 1 and manifest.calibration.buckets_requested == 4
    assert json.loads((out / "report.json").read_text())["summary"]["buckets_requested"] == 4
