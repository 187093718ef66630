"""qcompile's QNN targets against onnxruntime's QNN quantization helpers, on the HTP simulator.

    python tools/compare_qnn_peers.py [--model builtin:reference] [--out out/qnn-peers] [--calib sample:32]
        [--held-out 16] [--samples 2] [--precision w8a16 w8a8] [--peers ort aimet] [--per-channel both]

Same float model (qcompile's canonical export at the same static batch), the same calibration rows
for every method (every row qcompile recorded, written once to OUT/calibration.npz; the table gives
the count), same held-out inputs; every model runs on the HTP simulator with CPU fallback disabled (a
peer graph HTP refuses is reported as such, then run with fallback allowed so its numbers still come).
Columns: eps SQNR/cosine vs fp32 on held-out inputs, and for models that sample, sample PSNR vs fp32
over `--samples` images sampled on HTP.

Peers: onnxruntime `get_qnn_qdq_config` + `quantize` (what its QNN EP docs prescribe), per-tensor
and per-channel, each as shipped and like for like: qcompile's QNN targets compute the timestep
embedding (every node fed by the timestep, labels and per-sample scalars alone) in float on the host,
and the like-for-like peer gets the same nodes through its `nodes_to_exclude` (left float, HTP may
take them in its own float precision or refuse them: the `on_htp` column says which). AIMET
QuantSim (aimet-onnx, HTP v73 config, exported as Q/DQ) when importable, as shipped (this tool gives
it no exclusions). Each evaluation runs in its own process: the simulator can crash. Writes peers.md and peers.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from compare_peers import (  # the sibling tool (tools/ is on sys.path when run)
    NPZ,
    FeedReader,
    describe_headline,
    headline,
    row_batches,
    untie_initializers,
    write_calibration_npz,
    write_table,
)

from qcompile.cli import main as qcompile_main
from qcompile.config import FidelitySettings
from qcompile.evaluation.evaluate import held_out_inputs
from qcompile.evaluation.fidelity import evaluate_sampling
from qcompile.evaluation.validate import compare_on_inputs
from qcompile.graph_io import load_graph, save_graph
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.host_time_embedding import (
    TimeEmbeddingCut,
    integer_inputs,
    scalar_inputs,
    timestep_only_nodes,
)
from qcompile.passes.static_shapes import StaticShapes
from qcompile.runtime import BucketRunner, OnnxRunner, static_chunks
from qcompile.targets.qnn import ep
from qcompile.targets.qnn.options import DEFAULT_BATCH
from qcompile.targets.qnn.target import QnnW8A8Target
from qcompile.targets.qnn.validate import _FewLabels

COLUMNS = ("method", "float_nodes", "calibration_rows", "on_htp", "eps_sqnr_db_mean", "eps_sqnr_db_min",
           "eps_cos_mean", "sample_psnr_db",
           "accuracy", "seconds")


class SessionRunner(BucketRunner):
    """One static-batch session (a peer's whole model, time embedding included) as a runner."""

    def __init__(self, session: ort.InferenceSession, batch: int, *, timestep_name, sample_name):
        super().__init__(1, bucket_edges=(), timestep_name=timestep_name, sample_name=sample_name)
        self.session = session
        self.batch = batch
        self.input_names = tuple(i.name for i in session.get_inputs())

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        chunks = static_chunks(feed, self.batch, set(feed))  # the reference model's inputs all lead with rows
        return np.concatenate([self.session.run(None, chunk)[0][:count] for chunk, count in chunks])


def static_float_model(artifact: Path, out: Path, batch: int) -> Path:
    """The artifact's float model at the shapes the artifact was built for (its manifest's `input_shapes`,
    else each input's example shape), batch `batch`: the static graph the peers quantize."""
    manifest = Manifest.read(artifact)
    graph = load_graph(manifest.fp32_path(artifact))
    examples = {i.name: i.shape for i in manifest.model.inputs}
    for t in graph.inputs:
        shape = manifest.input_shapes.get(t.name) or examples.get(t.name)
        if shape is not None and t.shape is not None and len(shape) == len(t.shape):
            t.shape = [t.shape[0], *shape[1:]]  # the batch stays symbolic: StaticShapes sets it
    PassManager([StaticShapes(batch)]).run(graph, PassContext())
    return save_graph(graph, out)


def host_nodes(fp32: Path, timestep: str | None) -> list[str]:
    """The nodes qcompile's QNN targets compute in float on the host (MoveTimeEmbeddingToHost's full
    cut), by name in the static float model."""
    if timestep is None:
        return []
    graph = load_graph(fp32)
    sources = {timestep, *integer_inputs(graph), *scalar_inputs(graph)}
    return [n.name for n in timestep_only_nodes(graph, sources, TimeEmbeddingCut.FULL)]


def ort_qnn_quantize(fp32: Path, out: Path, feeds, *, activation: str, per_channel: bool,
                     exclude: list[str] | None = None) -> Path:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    untied = untie_initializers(fp32, out.with_name("untied.onnx"))
    pre = out.with_name("preprocessed.onnx")
    if not qnn_preprocess_model(str(untied), str(pre)):
        pre = untied

    act = QuantType.QUInt16 if activation == "w8a16" else QuantType.QUInt8
    config = get_qnn_qdq_config(str(pre), FeedReader(feeds), activation_type=act, weight_type=QuantType.QUInt8,
                                per_channel=per_channel, nodes_to_exclude=exclude)
    quantize(str(pre), str(out), config)
    return out


def aimet_quantize(fp32: Path, out: Path, feeds, *, activation: str, exclude: list[str] | None = None) -> Path:
    """AIMET QuantSim (aimet-onnx) with its HTP v73 config, min-max, exported as a Q/DQ ONNX model
    (int8 weights pre-quantized, int32 biases, unsigned activations). aimet-onnx's dependencies pull a
    CUDA torchvision; install it with `pip install --no-deps aimet-onnx onnx2torch` plus bokeh, hvplot,
    jsonschema, osqp, pandas, psutil, pybind11 (ENVIRONMENT.md)."""
    import os

    import aimet_onnx
    import onnx
    from aimet_onnx.common.defs import QuantScheme
    from aimet_onnx.quantsim import QuantizationSimModel

    config = os.path.join(os.path.dirname(aimet_onnx.__file__), "common/quantsim_config/htp_quantsim_config_v73.json")
    sim = QuantizationSimModel(onnx.load(str(fp32)), param_type="int8",
                               activation_type="int16" if activation == "w8a16" else "int8",
                               quant_scheme=QuantScheme.min_max, config_file=config,
                               providers=["CPUExecutionProvider"])
    sim.compute_encodings(feeds)
    qdq = sim.to_onnx_qdq(export_int32_bias=True, prequantize_constants=True)
    onnx.save_model(qdq, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def htp_or_fallback(path: Path) -> tuple[ort.InferenceSession, bool]:
    try:
        return ep.htp_session(path), True
    except Exception as exc:  # noqa: BLE001 - a refused graph is a result
        print(f"[qnn-peers] {path}: not entirely on HTP ({str(exc)[:160]}); running with CPU fallback")
        return ep.htp_session(path, session_config={"session.disable_cpu_ep_fallback": "0"}), False


def judge(runner, reference, held_out, adapter, samples: int, sampler, names) -> dict:
    steps = compare_on_inputs(reference, runner, held_out, batch=DEFAULT_BATCH)
    sqnrs = [s.eps_sqnr_db for s in steps]
    row = {"eps_sqnr_db_mean": float(np.mean(sqnrs)), "eps_sqnr_db_min": float(np.min(sqnrs)),
           "eps_cos_mean": float(np.mean([s.eps_cos for s in steps]))}
    setup = adapter.sampling()
    if setup is not None and samples:
        result = evaluate_sampling(reference, runner, _FewLabels(setup, samples),
                                   FidelitySettings(sampler=sampler, per_class=1), sample_name=names[0],
                                   timestep_name=names[1])
        row.update(sample_psnr_db=result.summary["sample_psnr_db"], accuracy=result.summary["accuracy_q"])
    return row


def _judge_child(spec: dict, queue) -> None:
    """Runs in a child process: the simulator can crash (a segfault in libQnnHtp.so on onnxruntime's
    W8A16 model of the reference), which must end one row, not the comparison."""
    artifact = Path(spec["artifact"])
    manifest = Manifest.read(artifact)
    src, model = manifest.source, manifest.model
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    names = (model.sample_input, model.timestep_input)
    held_out = held_out_inputs(adapter, spec["held_out"], src.seed)
    reference = OnnxRunner([manifest.fp32_path(artifact)], timestep_name=names[1], sample_name=names[0])
    if spec["model"] is None:
        runner, on_htp = QnnW8A8Target().runner(artifact, manifest, htp=True), True
    else:
        session, on_htp = htp_or_fallback(Path(spec["model"]))
        runner = SessionRunner(session, DEFAULT_BATCH, timestep_name=names[1], sample_name=names[0])
    queue.put({"on_htp": on_htp, **judge(runner, reference, held_out, adapter, spec["samples"],
                                         FidelitySettings().sampler, names)})


def run_isolated(name: str, spec: dict, t0: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_judge_child, args=(spec, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        print(f"[qnn-peers] {name}: the evaluation process died (exit code {child.exitcode})")
        return {"method": f"{name} (crashed the simulator: exit {child.exitcode})", "on_htp": "crash",
                "seconds": round(time.perf_counter() - t0, 1)}
    return {"method": name, **queue.get(), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:reference")
    ap.add_argument("--out", type=Path, default=Path("out/qnn-peers"))
    ap.add_argument("--calib", default=None, help="qcompile's --calib: the recording every method calibrates on")
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2, help="images sampled on HTP per method (0: none)")
    ap.add_argument("--peers", nargs="+", default=["ort", "aimet"], choices=["ort", "aimet"])
    ap.add_argument("--per-channel", default="both", choices=["both", "yes", "no"],
                    help="onnxruntime helper rows: per-tensor weights, per-channel, or both")
    ap.add_argument("--skip-qcompile", action="store_true", help="reuse the qcompile rows of an earlier run")
    ap.add_argument("--per-class", type=int, default=2, help="qcompile build's own (CPU EP) sample metrics")
    ap.add_argument("--precision", nargs="+", default=["w8a16", "w8a8"], choices=["w8a16", "w8a8"])
    args = ap.parse_args(argv)
    cache = args.out / "calib-cache"
    rows, headlines = [], []
    first, data = None, None
    for precision in args.precision:
        t0 = time.perf_counter()
        out = args.out / f"qcompile-{precision}"
        build = ["build", args.model, "--target", f"qnn-{precision}", "--out", str(out), "--calib-cache", str(cache),
                 "--min-sqnr-db", "-1000", "--min-psnr-db", "-1000", "--per-class", str(args.per_class),
                 "--device-samples", "0"]
        build += ["--calib", args.calib] if args.calib else []
        build += ["--from-export", str(first)] if first else []
        if not (args.skip_qcompile and (out / "manifest.json").is_file()):
            qcompile_main(build)
        first = first or out
        manifest = Manifest.read(out)
        fp32 = static_float_model(out, args.out / "fp32-static" / "model.onnx", DEFAULT_BATCH)
        exclude = host_nodes(fp32, manifest.model.timestep_input)
        data = data or write_calibration_npz(cache, args.out / NPZ)
        feeds = [f for f in row_batches(data, DEFAULT_BATCH) if len(next(iter(f.values()))) == DEFAULT_BATCH]
        calibration_rows = DEFAULT_BATCH * len(feeds)  # the static-batch model takes whole batches only
        spec = {"artifact": str(out), "held_out": args.held_out, "samples": args.samples}
        ours = f"qcompile qnn-{precision}"
        if not args.skip_qcompile:
            rows.append({**run_isolated(ours, {**spec, "model": None}, t0), "float_nodes": len(exclude),
                         "calibration_rows": manifest.calibration.rows})
        channels = {"both": (False, True), "yes": (True,), "no": (False,)}[args.per_channel]
        peers = [(f"onnxruntime get_qnn_qdq_config {precision}" + (" per-channel" if pc else "")
                  + (", qcompile's host nodes float" if like else ", as shipped"),
                  f"peer-ort-{precision}-{'pc' if pc else 'pt'}-{'like' if like else 'shipped'}", ort_qnn_quantize,
                  {"per_channel": pc, "exclude": exclude if like else None}, like)
                 for pc in channels for like in (False, True) if "ort" in args.peers]
        if "aimet" in args.peers:
            peers.append((f"AIMET QuantSim {precision} (htp v73 config), as shipped", f"peer-aimet-{precision}",
                          aimet_quantize, {}, False))
        for name, folder, quantize_peer, options, like in peers:
            t0 = time.perf_counter()
            work = args.out / folder
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            base = {"like_for_like": like, "float_nodes": len(exclude) if like else 0,
                    "calibration_rows": calibration_rows}
            try:
                path = quantize_peer(fp32, work / "model.onnx", feeds, activation=precision, **options)
            except ImportError as exc:
                print(f"[qnn-peers] {name}: not installed ({exc.name}); skipped")
                continue
            except Exception as exc:  # noqa: BLE001 - a peer failing on a diffusers graph is a result
                print(f"[qnn-peers] {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append({**base, "method": f"{name} (failed: {type(exc).__name__})"})
                continue
            rows.append({**run_isolated(name, {**spec, "model": str(path)}, t0), **base})
        same = [r for r in rows if precision in r["method"]]
        headlines.append(headline(same, ours, "eps_sqnr_db_mean"))
        write_table(args.out, rows, COLUMNS)  # after each precision: a long run keeps what it measured
    result = {"model": args.model, "rows": rows, "headlines": [h for h in headlines if h]}
    print(write_table(args.out, rows, COLUMNS, extra={"headlines": result["headlines"]}))
    for h in result["headlines"]:
        print(describe_headline(h))
    return result


if __name__ == "__main__":
    main()
