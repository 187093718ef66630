"""W8A8 per timestep bucket: probe rows keep a bucket's CFG pairs together, the CFG-gap ratio of a probe
is the evaluation's, each bucket's graph raises its own layers with the cost recorded per bucket,
bias correction lowers each layer's mean error on the runtime, and what cannot work is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.bucket_precision import (
    BucketTargets,
    Probe,
    ProbeRows,
    bucket_probe_rows,
    cfg_gap_max,
    choose_wide_layers,
)
from qcompile.calibration.inputs import InputSet
from qcompile.calibration.recorder import RecordingWriter
from qcompile.cli import main
from qcompile.evaluation.metrics import relative_error

MODEL = "builtin:tiny-unet2d"
FAST = ["--calib", "synthetic:6", "--validate", "2"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The float model exported once and calibrated once (4 timesteps: two per bucket at --buckets 2);
    the builds below start from them, as `--from-export` and `--calib-cache` users do."""
    root = tmp_path_factory.mktemp("w8a8")
    assert main(["export", MODEL, "--out", str(root / "export")]) == 0
    assert main(["calibrate", MODEL, "--from-export", str(root / "export"), "--calib", "synthetic:4",
                 "--calib-cache", str(root / "cache")]) == 0
    return ["--from-export", str(root / "export"), "--calib-cache", str(root / "cache"), "--validate", "2"]


def _read(folder):
    return json.loads((folder / "manifest.json").read_text()), json.loads((folder / "report.json").read_text())


def _recording(tmp_path, timesteps=(900.0, 500.0, 100.0), batch=8):
    """A recording as a guided sampler writes it: per call, `batch` uncond rows then `batch` cond rows;
    each row's value encodes (call, half, position) so the test can see which rows were taken."""
    writer = RecordingWriter(tmp_path / "rec")
    for call, t in enumerate(timesteps):
        rows = np.array([call * 100 + half * 10 + j for half in (0, 1) for j in range(batch)], np.float32)
        writer.add({"sample": rows[:, None], "timestep": np.full(2 * batch, t, np.float32)}, t, step=call, cfg=True)
    return writer.close({"test": True})


def test_probe_rows_keep_cfg_pairs_of_the_bucket_timesteps(tmp_path):
    rec = _recording(tmp_path)
    rows = bucket_probe_rows(rec, [500.0, 100.0], rows=8)  # two timesteps: 2 pairs each
    values = rows.inputs.arrays["sample"][:, 0]
    assert rows.inputs.count == 8 and len(rows.pairs) == 4
    assert set(rows.inputs.timesteps.tolist()) == {500.0, 100.0}
    for (u, c), t in zip(rows.pairs, rows.pair_timesteps, strict=True):
        assert values[c] - values[u] == 10.0  # the same sample's cond half of the same call
        assert rows.inputs.timesteps[u] == rows.inputs.timesteps[c] == t
    # positions spread over the batch, not the first rows only
    assert sorted({int(v) % 10 for v in values}) == [0, 7]


def test_cfg_gap_of_a_probe_is_the_worst_timestep_ratio():
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(8, 4)).astype(np.float32)
    got = expected.copy()
    got[1] += 0.5  # an error on one cond row at t=900
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    rows = ProbeRows(InputSet({"x": expected}, None), pairs, np.array([900.0, 900.0, 100.0, 100.0]))
    want = relative_error(np.concatenate([expected[[1]] - expected[[0]], expected[[3]] - expected[[2]]]),
                          np.concatenate([got[[1]] - got[[0]], got[[3]] - got[[2]]]))
    assert cfg_gap_max(expected, got, rows) == pytest.approx(want, rel=1e-12) and want > 0.1
    assert cfg_gap_max(expected, expected, rows) == 0.0


def test_fewest_layers_meeting_both_targets_by_bisection():
    # Each raised layer adds 1 dB and takes 0.1 off the gap: 3 layers reach 33 dB, 5 reach a gap of 0.5.
    calls = []

    def measure(names):
        calls.append(len(names))
        return Probe(30.0 + len(names), 1.0 - 0.1 * len(names))

    names = [f"l{i}" for i in range(10)]
    wide, reached, met = choose_wide_layers(names, measure, BucketTargets(33.0, 0.5), max_wide=10)
    assert met and wide == tuple(names[:5]) and reached == Probe(35.0, 0.5)
    wide, reached, met = choose_wide_layers(names, measure, BucketTargets(50.0, None), max_wide=4)
    assert not met and wide == tuple(names[:4]) and reached.sqnr_db == 34.0


def _stored_bytes(path):
    """(all activation bytes, those stored at 16 bits, those of the graph outputs) of a Q/DQ model."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.value_info, *g.output)}
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    total = wide = out = 0
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in consts:
            continue
        zero = next(i for i in g.initializer if i.name == n.input[2])
        size = int(np.prod(shapes[n.output[0]])) * (2 if zero.data_type == onnx.TensorProto.UINT16 else 1)
        total += size
        if zero.data_type == onnx.TensorProto.UINT16:
            wide += size
            if any(o in outputs for r in readers.get(n.output[0], []) for o in r.output):
                out += size
    return total, wide, out


def test_qnn_w8a8_buckets_raise_their_own_layers_and_record_the_cost(tmp_path, made):
    out = tmp_path / "qnn"
    code = main(["build", MODEL, "--target", "qnn-w8a8", "--buckets", "2", "--mixed-precision-per-bucket",
                 "--max-float-layers", "2", "--mixed-precision-candidates", "2", "--device-samples", "0",
                 "--static-batch", "1", *made, "--out", str(out)])
    folder = out if code == 0 else tmp_path / "qnn.failed"
    manifest, report = _read(folder)
    q = manifest["quantization"]
    buckets = [b["precision"] for b in manifest["buckets"]]
    assert len(buckets) == 2 and all(len(b["layers"]) == 2 for b in buckets)
    assert set(q["wide_layers"]) == {n for b in buckets for n in b["layers"]} == set(q["mixed_precision"]["layers"])
    assert q["mixed_precision"]["per_bucket"] and q["mixed_precision"]["fallback"] == "wide (uint16)"
    # the cost, recomputed from the bucket files: bytes of every stored activation (QuantizeLinear outputs)
    for b, m in zip(buckets, manifest["buckets"], strict=True):
        total, wide, outputs = _stored_bytes(folder / m["files"][0])
        assert b["wide_dtype"] == "uint16"
        assert b["wide_activation_bytes_fraction"] == pytest.approx(wide / total, abs=1e-5)
        assert outputs / total < b["wide_activation_bytes_fraction"] < 0.5, b  # more than the 16-bit outputs
        assert 0.0 < b["wide_mac_fraction"] < 1.0
    for b, m in zip(buckets, manifest["buckets"], strict=True):  # synthetic calibration: one row per timestep
        assert b["probe_rows"] == len(m["calibration_timesteps"]) >= 2 and np.isfinite(b["reached_sqnr_db"])
    widen = [e for e in manifest["pass_log"] if e["pass"] == "widen-activations"]
    assert len(widen) == 2 and all(e["modified"] for e in widen)
    assert [b.get("precision", {}).get("layers") for b in report["buckets"]] == [b["layers"] for b in buckets]


def test_bias_correction_lowers_each_layers_mean_error(tmp_path, made):
    out = tmp_path / "bc"
    code = main(["build", MODEL, "--target", "ort-int8", "--buckets", "2", "--bias-correction", "--calib",
                 "synthetic:16", "--validate", "2", "--from-export", made[1], "--out", str(out)])
    folder = out if code == 0 else tmp_path / "bc.failed"
    manifest, _ = _read(folder)
    for b in manifest["buckets"]:
        bc = b["precision"]["bias_correction"]
        # every Conv of the model; the bucket's rows (synthetic calibration: one row per timestep)
        assert bc["layers"] == 31 and bc["rows"] == len(b["calibration_timesteps"]) >= 4
        assert bc["relative_mean_error_after"] < 0.85 * bc["relative_mean_error_before"], bc


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "qnn-w8a8", "--mixed-precision-cfg-gap", "0.5"],
     "--mixed-precision-cfg-gap: a per-bucket target; add --mixed-precision-per-bucket"),
    (["--target", "qnn-w8a8", "--mixed-precision-per-bucket"],
     "--mixed-precision-per-bucket: needs a target"),
    (["--target", "qnn-w8a16", "--mixed-precision-per-bucket", "--max-float-layers", "2"],
     "qnn-w8a16 has no precision to fall back to"),
    (["--target", "qnn-w8a8", "--mixed-precision-per-bucket", "--mixed-precision-cfg-gap", "0"],
     "--mixed-precision-cfg-gap 0.0: needs a positive number"),
    (["--target", "qnn-w8a8", "--mixed-precision-per-bucket", "--max-float-layers", "2", "--smoothquant", "0.5"],
     "--mixed-precision-per-bucket and --smoothquant: not together"),
    (["--target", "qnn-w8a8", "--mixed-precision", "30", "--mixed-precision-candidates", "8"],
     "--mixed-precision-candidates: a per-bucket setting; add --mixed-precision-per-bucket"),
])
def test_refused_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "x"
    assert main(["build", MODEL, *args, *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_cfg_gap_target_needs_guided_rows(tmp_path, capsys, made):
    out = tmp_path / "x"
    code = main(["build", MODEL, "--target", "qnn-w8a8", "--buckets", "2", "--mixed-precision-per-bucket",
                 "--mixed-precision-cfg-gap", "0.5", *made, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qcompile:")]
    assert code == 2 and len(err) == 1 and "no classifier-free guidance pairs" in err[0] and not out.exists()


def test_tflite_buckets_keep_their_own_layers_float(tmp_path, made):
    pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
    out = tmp_path / "tfl"
    code = main(["build", MODEL, "--target", "tflite-int8", "--full-integer", "--buckets", "2",
                 "--mixed-precision-per-bucket", "--max-float-layers", "2", "--mixed-precision-candidates", "2",
                 *made, "--out", str(out)])
    folder = out if code == 0 else tmp_path / "tfl.failed"
    manifest, report = _read(folder)
    buckets = [b["precision"] for b in manifest["buckets"]]
    assert all(len(b["layers"]) == 2 and b["wide_dtype"] == "float32" for b in buckets)
    # what the .tflite keeps float: every bucket's layers (one subgraph per bucket, in the interpreter)
    assert set(manifest["quantization"]["float_layers"]) == {n for b in buckets for n in b["layers"]}
    assert all(0.0 < b["wide_activation_bytes_fraction"] < 0.2 and 0.0 < b["wide_mac_fraction"] < 0.2
               for b in buckets), buckets
    assert report["checks"]["interpreter_within_1_lsb"], report["device"]
