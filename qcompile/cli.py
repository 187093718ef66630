"""The `qcompile` command line.

Exit codes: 0 success; 2 a user error (one line on stderr, nothing written); 1 the build finished but
missed a threshold (the report says which). A traceback means a bug in qcompile.
Argument groups are written once and shared by the subcommands that take them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_THRESHOLD, EXIT_USER_ERROR = 0, 1, 2


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
    g.add_argument("--calib", default="synthetic:16", help="synthetic:N, or an .npz of inputs keyed by ONNX input name")
    g.add_argument("--estimator", default="max", help=f"one of {', '.join(e.value for e in Estimator)}")
    g.add_argument("--buckets", type=int, default=1, help="timestep buckets, each with its own activation scales")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep layers whose module path or node name matches in float (repeatable)")
    g.add_argument("--full-integer", action="store_true",
                   help="quantize every layer, ignoring the model family's default float layers")
    g.add_argument("--validate", type=int, default=8, help="held-back inputs for the report")
    g.add_argument("--min-sqnr-db", type=float, default=10.0, help="threshold on mean eps SQNR (exit 1 below)")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log every pass")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description="Compile diffusion models into quantized, deployable artifacts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="export, calibrate, quantize, emit and validate")
    _model_args(b)
    _out_args(b)
    _quant_args(b)
    _log_args(b)
    e = sub.add_parser("export", help="export the float model to canonical ONNX, verified against torch")
    _model_args(e)
    _out_args(e)
    _log_args(e)
    i = sub.add_parser("inspect", help="summarise an artifact folder or an ONNX file")
    i.add_argument("path", type=Path)
    return parser


def _config(args: argparse.Namespace, *, with_quant: bool):
    from qcompile.config import CalibSpec, CompileConfig, Estimator, TargetName, Thresholds
    from qcompile.errors import UserError

    common = {"model": args.model, "component": args.component, "out_dir": args.out, "seed": args.seed,
              "opset": args.opset}
    if not with_quant:
        return CompileConfig(**common)
    if args.buckets != 1:
        raise UserError(f"--buckets {args.buckets}: timestep buckets come with timestep-aware calibration, "
                        "not in this version; use --buckets 1")
    return CompileConfig(**common, target=TargetName.parse(args.target), calib=CalibSpec.parse(args.calib),
                         estimator=Estimator.parse(args.estimator), buckets=args.buckets,
                         exclude=tuple(args.exclude), full_integer=args.full_integer,
                         validate_count=args.validate, thresholds=Thresholds(eps_sqnr_db_mean=args.min_sqnr_db))


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from qcompile.build import build

        result = build(_config(args, with_quant=True))
        print(f"[qcompile] artifact: {result.out_dir}")
        return EXIT_OK if result.passed else EXIT_THRESHOLD
    if args.command == "export":
        from qcompile.build import export_only

        export_only(_config(args, with_quant=False))
        return EXIT_OK
    from qcompile.inspect import inspect_path

    print(inspect_path(args.path))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option already reported in one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(name)s: %(message)s")
    from qcompile.errors import UserError

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
        return 130


if __name__ == "__main__":
    sys.exit(main())
