"""The `qcompile` command line.

Exit codes scripts can rely on: 0 success; 1 the build finished but missed a threshold (the report
says which; `--out` is untouched, the build is in `<out>.failed`); 2 a user error (one line on stderr,
nothing written); 3 an internal error in qcompile (one line; the traceback with `-v`); 130 / 143
interrupted (Ctrl-C / SIGTERM: the staging folder is removed, `--out` untouched).
Third-party warnings (torch, diffusers, onnxruntime) reach stderr only with `-v`.
Argument groups are written once and shared by the subcommands that take them.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_THRESHOLD, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `with` block cleans up (staging and temp folders)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _quiet_third_parties(verbose: bool) -> None:
    """Libraries' own warnings and log lines say nothing to a user of the CLI and bury its one-line
    messages; -v lets them through."""
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch", "onnxscript", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line and exits 2, like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        print(f"qcompile: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", help="diffusers model folder, pipeline folder (with --component), or builtin:<name>")
    g.add_argument("--component", help="pipeline component (unet, transformer, vae, vae-encoder, text_encoder)")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and synthetic inputs")
    g.add_argument("--opset", type=int, default=20, help="ONNX opset for export (>= 18)")


def _out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="artifact folder (replaced only when the build succeeds)")


def _quant_args(p: argparse.ArgumentParser) -> None:
    from qcompile.config import Estimator, TargetName

    g = p.add_argument_group("quantization")
    g.add_argument("--target", default="ort-int8", help=f"one of {', '.join(t.value for t in TargetName)}")
    g.add_argument("--estimator", default="max", help=f"one of {', '.join(e.value for e in Estimator)}")
    g.add_argument("--buckets", type=int, default=1, help="timestep buckets, each with its own activation scales")
    g.add_argument("--bucket-method", default="data", help="uniform, or data (edges chosen from the statistics)")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep layers whose module path or node name matches in float (repeatable)")
    g.add_argument("--full-integer", action="store_true",
                   help="quantize every layer, ignoring the model family's default float layers")
    g.add_argument("--split-shortcut", action="store_true",
                   help="split Conv(Concat(deep, skip)) in UNet up blocks so each input gets its own scale")
    g.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant the quantized MatMul/Gemm layers with this alpha (0..1; 0.5 splits evenly)")
    g.add_argument("--mixed-precision", type=float, default=None, metavar="SQNR_DB",
                   help="keep the most sensitive layers float until the output SQNR on recorded inputs reaches this")
    g.add_argument("--shape", action="append", default=[], metavar="NAME=D0xD1x...",
                   help="static-shape targets (tflite-*, qnn-*): the shape input NAME is built for, batch first "
                        "(repeatable); default: the calibration data's shapes. ort-int8 artifacts stay dynamic")
    g.add_argument("--max-float-layers", type=int, default=None, metavar="N",
                   help="at most N layers kept float by --mixed-precision (alone: exactly the N most sensitive)")
    g.add_argument("--mixed-precision-per-bucket", action="store_true",
                   help="choose the layers per timestep bucket, each on its own rows and ranges (with "
                        "--mixed-precision, --mixed-precision-cfg-gap and/or --max-float-layers, per bucket)")
    g.add_argument("--mixed-precision-cfg-gap", type=float, default=None, metavar="R",
                   help="per-bucket target: CFG-gap ratio at most R at every timestep of the bucket's rows")
    g.add_argument("--mixed-precision-candidates", type=int, default=None, metavar="N",
                   help="per bucket, measure the sensitivity of only the N layers whose activations quantize "
                        "worst there by the statistics (default 32)")
    g.add_argument("--bias-correction", action="store_true",
                   help="per bucket, subtract each quantized layer's mean output error per channel on "
                        "calibration rows (measured on the target's runtime) from its bias")
    _ray_arg(g, "run mixed precision's per-layer sensitivity probes as Ray tasks on the cluster at ADDRESS "
                "(none: a local Ray)")


def _ray_arg(g, help: str) -> None:
    """`--ray [ADDRESS]`, as every command that can fan out on Ray takes it."""
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=help)


def _target_args(p: argparse.ArgumentParser) -> None:
    """Each target's own options, declared by the target (qcompile.target.TARGETS); an option the chosen
    target does not take is refused in one line."""
    from qcompile.target import cli_options

    g = p.add_argument_group("target options")
    for flag, (spec, targets) in cli_options().items():
        who = ", ".join(t.value for t in targets)
        g.add_argument(flag, dest=_dest(flag), type=_cli_parser(flag, spec.parse), default=None,
                       metavar=spec.metavar, action="append" if spec.repeatable else "store",
                       help=f"[{who}] {spec.help}")


def _dest(flag: str) -> str:
    return "target_" + flag.lstrip("-").replace("-", "_")


def _cli_parser(flag: str, parse):
    """The option's parser, reporting a bad value in one line naming the flag."""

    def parse_value(text: str):
        from qcompile.errors import UserError

        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_value.__name__ = flag
    return parse_value


def _eval_args(p: argparse.ArgumentParser) -> None:
    from qcompile.config import FidelitySettings, SamplerSettings, SchedulerKind, Thresholds

    s, f, t = SamplerSettings(), FidelitySettings(), Thresholds()
    g = p.add_argument_group("evaluation")
    g.add_argument("--validate", type=int, default=8, help="held-back inputs (models without a sampler)")
    g.add_argument("--scheduler", default=s.scheduler.value, help=f"one of {', '.join(k.value for k in SchedulerKind)}")
    g.add_argument("--steps", type=int, default=s.steps, help="sampling steps (models with a sampler)")
    g.add_argument("--guidance", type=float, default=s.guidance, help="classifier-free guidance scale")
    g.add_argument("--per-class", type=int, default=f.per_class, help="samples per class for sample metrics")
    g.add_argument("--device-samples", type=int, default=f.device_samples,
                   help="images sampled on the device simulator (qnn targets; 0: none)")
    g.add_argument("--min-sqnr-db", type=float, default=t.eps_sqnr_db_mean,
                   help="threshold on mean eps SQNR in dB (exit 1 below)")
    g.add_argument("--min-psnr-db", type=float, default=t.sample_psnr_db,
                   help="threshold on mean sample PSNR in dB, models with a sampler (exit 1 below)")
    g.add_argument("--max-cfg-gap", type=float, default=t.cfg_gap_ratio_max,
                   help="prompt-steering gate, models sampled with guidance: exit 1 when at any step the "
                        "quantization error of (cond - uncond) exceeds this fraction of its float magnitude "
                        "(default: off)")


def _fidelity(args: argparse.Namespace):
    from qcompile.config import FidelitySettings, SamplerSettings, SchedulerKind, Thresholds
    from qcompile.errors import UserError

    if args.steps < 1 or args.per_class < 1 or args.device_samples < 0:
        raise UserError("--steps and --per-class must be at least 1, --device-samples at least 0")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UserError(f"--guidance {args.guidance}: needs a finite number of at least 0")
    sampler = SamplerSettings(scheduler=SchedulerKind.parse(args.scheduler), steps=args.steps, guidance=args.guidance)
    return (FidelitySettings(sampler=sampler, per_class=args.per_class, device_samples=args.device_samples),
            Thresholds(eps_sqnr_db_mean=args.min_sqnr_db, sample_psnr_db=args.min_psnr_db,
                       cfg_gap_ratio_max=_positive_or_none("--max-cfg-gap", args.max_cfg_gap)))


def _positive_or_none(flag: str, value: float | None) -> float | None:
    from qcompile.errors import UserError

    if value is not None and not value > 0:  # also refuses nan
        raise UserError(f"{flag} {value}: needs a positive number")
    return value


def _calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=None,
                   help="sample:N (N trajectories of the model's own sampler), synthetic:N, or an .npz of inputs "
                        "keyed by ONNX input name; default sample:32 for models that can sample, else synthetic:16")
    g.add_argument("--calib-cache", type=Path, default=None,
                   help="statistics folder: reused when it exists (same graph only), written otherwise")
    g.add_argument("--from-export", type=Path, default=None, metavar="DIR",
                   help="reuse the float model of a `qcompile export` or artifact folder instead of exporting")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log every pass")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description="Compile diffusion models into quantized, deployable artifacts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="export, calibrate, quantize, emit and validate")
    _model_args(b)
    _out_args(b)
    _calib_args(b)
    _quant_args(b)
    _target_args(b)
    _eval_args(b)
    _log_args(b)
    e = sub.add_parser("export", help="export the float model to canonical ONNX, verified against torch")
    _model_args(e)
    _out_args(e)
    _log_args(e)
    c = sub.add_parser("calibrate", help="record inputs and write a calibration cache (statistics per timestep)")
    _model_args(c)
    _calib_args(c)
    _eval_args(c)
    _log_args(c)
    c.add_argument("--shard", default=None, metavar="I/N",
                   help="only the I-th of N shares of the rows (a shard cache; `qcompile merge-cache` joins them)")
    _ray_arg(c, "run --shards shards as Ray tasks on the cluster at ADDRESS (none: a local Ray) and merge them")
    c.add_argument("--shards", type=int, default=None, metavar="N", help="shards for --ray (default 2)")
    m = sub.add_parser("merge-cache", help="merge the shard caches of `qcompile calibrate --shard I/N` into one cache")
    m.add_argument("out", type=Path, help="the new calibration cache folder")
    m.add_argument("shards", type=Path, nargs="+", metavar="SHARD", help="every shard cache, 1/N..N/N")
    _log_args(m)
    v = sub.add_parser("eval", help="evaluate an artifact folder against its float model; rewrites its report")
    v.add_argument("artifact", type=Path)
    _eval_args(v)
    _log_args(v)
    i = sub.add_parser("inspect", help="summarise an artifact folder, a calibration cache or an ONNX file")
    i.add_argument("path", type=Path)
    i.add_argument("--plot", type=Path, default=None, help="for a calibration cache: write a PNG of ranges vs timestep")
    return parser


def _build_settings(args: argparse.Namespace) -> dict:
    """`qcompile.api.build`'s keyword arguments from the command line (the API parses the option text)."""
    from qcompile.config import TargetName
    from qcompile.target import cli_options, options_from_cli

    fidelity, thresholds = _fidelity(args)
    target = TargetName.parse(args.target)
    given = {flag: getattr(args, _dest(flag)) for flag in cli_options()}
    options = options_from_cli(target, {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()})
    return {"component": args.component, "seed": args.seed, "opset": args.opset, "target": target,
            "target_options": options, "calib": args.calib, "calib_cache": args.calib_cache,
            "export_from": args.from_export, "estimator": args.estimator, "buckets": args.buckets,
            "bucket_method": args.bucket_method, "exclude": args.exclude, "full_integer": args.full_integer,
            "mixed_precision_sqnr_db": args.mixed_precision, "max_float_layers": args.max_float_layers,
            "mixed_precision_per_bucket": args.mixed_precision_per_bucket,
            "mixed_precision_cfg_gap": args.mixed_precision_cfg_gap,
            "mixed_precision_candidates": args.mixed_precision_candidates, "bias_correction": args.bias_correction,
            "ray": args.ray, "split_shortcut": args.split_shortcut, "smoothquant_alpha": args.smoothquant,
            "shapes": args.shape, "validate_count": args.validate, "thresholds": thresholds,
            "fidelity": fidelity}


def _run(args: argparse.Namespace) -> int:
    from qcompile import api

    if args.command == "build":
        result = api.build(args.model, args.out, **_build_settings(args))
        print(f"[qcompile] artifact: {result.out_dir}")
        return EXIT_OK if result.passed else EXIT_THRESHOLD
    if args.command == "export":
        api.export(args.model, args.out, component=args.component, seed=args.seed, opset=args.opset)
        return EXIT_OK
    if args.command == "eval":
        return _eval(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "merge-cache":
        print(api.merge_cache(args.out, args.shards).summary())
        return EXIT_OK
    from qcompile.inspect import inspect_path

    print(inspect_path(args.path, args.plot))
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from qcompile import api
    from qcompile.errors import UserError

    if args.calib_cache is None:
        raise UserError("qcompile calibrate needs --calib-cache DIR (where the statistics go)")
    fidelity, _ = _fidelity(args)
    cache = api.calibrate(args.model, args.calib_cache, component=args.component, calib=args.calib,
                          sampler=fidelity.sampler, seed=args.seed, opset=args.opset, export_from=args.from_export,
                          shard=args.shard, ray=args.ray, shards=args.shards)
    print(cache.summary() if args.shard is None else f"{cache.folder}: calibration shard {args.shard}, "
          f"{cache.meta['shard']['rows']} of {cache.meta['samples']['rows']} rows")
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from qcompile.evaluation.evaluate import evaluate_artifact, held_out_inputs
    from qcompile.evaluation.report import format_table
    from qcompile.manifest import Manifest
    from qcompile.models.source import resolve_model

    manifest = Manifest.read(args.artifact)
    src = manifest.source
    adapter = resolve_model(src.model, src.component, seed=src.seed)
    fidelity, thresholds = _fidelity(args)
    held_out = held_out_inputs(adapter, args.validate, src.seed, manifest)
    report = evaluate_artifact(args.artifact, adapter, held_out=held_out,
                               thresholds=thresholds, fidelity=fidelity, manifest=manifest)
    print(format_table(report))
    return EXIT_OK if report["passed"] else EXIT_THRESHOLD


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option already reported in one line
        return int(exc.code or 0)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    _quiet_third_parties(verbose)
    from qcompile.errors import UserError

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _run(args)
    except UserError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `qcompile inspect ... | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("qcompile: interrupted; nothing was written to --out", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("qcompile: terminated; nothing was written to --out", file=sys.stderr)
        return EXIT_SIGTERM
    except Exception as exc:  # a bug in qcompile, not the user's input
        if verbose:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"qcompile: internal error: {type(exc).__name__}: {first} (a bug in qcompile; -v shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
