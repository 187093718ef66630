"""Export an adapter's module to a float ONNX model and prove it matches torch.

Why the steps are what they are:
- dynamo exporter first (cleaner graphs, module scopes in node metadata); the legacy TorchScript
  exporter is the fallback when dynamo fails or disagrees with torch beyond `tolerance`.
- weights always go to one external `<stem>.data` file, so models over 2 GB take the same path as
  tiny ones and the .onnx protobuf stays small enough to load quickly in passes.
- the axes the adapter names dynamic (`input_axes`: batch, latent height/width, prompt length) stay
  symbolic, one symbol per axis name, with their valid multiples and limits as torch.export Dims;
  the check runs the exported graph in onnxruntime at batch 1 with the default sizes and at batch 2
  with another valid value of every dynamic axis, so a size baked into the graph is caught.
- every node gets `qcompile.module` metadata (the torch module path it came from) so passes can
  keep layers in float by module-path regex, and a unique non-empty name.
- files are written in a temporary folder and renamed into place, the .onnx last: a killed export
  never leaves a complete-looking model.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from qcompile.errors import UserError
from qcompile.export_child import (
    CHILD_EXPORT_BYTES,
    ChildExport,
    ChildKilled,
    ModelSource,
    export_in_child,
    exports_in_child,
)
from qcompile.models.base import Axis

log = logging.getLogger("qcompile.export")

MODULE_KEY = "qcompile.module"
# Dynamo metadata we drop: per-node Python stack traces and FX dumps make a real UNet's protobuf
# tens of MB and nothing downstream reads them. Scopes and class hierarchy are kept.
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace")


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    exporter: str  # "dynamo" | "legacy"
    opset: int
    max_abs_diff: float  # ONNX (onnxruntime CPU) vs torch on the dummy inputs, at two shapes
    seconds: float
    notes: tuple[str, ...] = ()


class ExportError(RuntimeError):
    """Neither exporter produced a model that runs and matches torch."""


EXPORTERS = ("dynamo", "legacy")


def export_onnx(adapter, out_path: Path, *, opset: int = 20, dynamic_batch: bool = True,
                tolerance: float = 1e-4, exporters: tuple[str, ...] = EXPORTERS, source: ModelSource | None = None,
                child_bytes: int = CHILD_EXPORT_BYTES) -> ExportResult:
    """Export `adapter.export_module()` to `out_path` (+ `<stem>.data`) and verify it in onnxruntime.

    `exporters` are tried in order until one gives a model within `tolerance` (max abs difference
    from torch, batch 1 and 2); ExportError names the model class when none does. With `source`
    (where the adapter was loaded from), a model of at least `child_bytes` of weights is exported in
    a child process (`qcompile.export_child`), so no torch copy of its weights outlives the export.
    """
    out_path = Path(out_path)
    if opset < 18:
        raise UserError(f"opset {opset} is not supported: use 18 or newer (17 gives invalid Split nodes)")
    unknown = set(exporters) - set(EXPORTERS)
    if unknown or not exporters:
        raise UserError(f"exporters must be chosen from {', '.join(EXPORTERS)}, got {exporters}")
    if out_path.suffix != ".onnx":
        raise UserError(f"{out_path}: the exported model's file name must end in .onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model_class = type(adapter.module).__name__
    start = time.perf_counter()
    failures: list[str] = []  # become the result's notes when a later exporter succeeds
    in_child = exports_in_child(adapter, source, child_bytes)
    checks = _checks(adapter, dynamic_batch)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.stem}.partial-", dir=out_path.parent) as tmp:
        staged = Path(tmp) / out_path.name
        for exporter in exporters:
            t0 = time.perf_counter()
            log.info("exporting %s with the %s exporter (opset %d)%s", model_class, exporter, opset,
                     " in a child process" if in_child else "")
            try:
                if in_child:
                    job = ChildExport(source, exporter, opset, dynamic_batch, str(staged),
                                      outputs_path=str(Path(tmp) / f"{exporter}-outputs.npz"),
                                      error_path=str(Path(tmp) / f"{exporter}-error.txt"))
                    wanted = export_in_child(job, checks)
                else:
                    wanted = _export_here(adapter, exporter, opset, dynamic_batch, staged, checks)
                diff = _verify(adapter, staged, checks, wanted)
            except ChildKilled as exc:  # the next exporter would need the same memory
                failures.append(f"{exporter} exporter failed: {exc}")
                break
            except Exception as exc:  # any exporter/runtime failure: record it and try the next one
                log.debug("%s exporter failed", exporter, exc_info=True)
                failures.append(f"{exporter} exporter failed: {_summary(exc)}")
                log.warning("%s", failures[-1])
                continue
            log.info("%s export took %.1fs, max abs diff vs torch %.3g", exporter, time.perf_counter() - t0, diff)
            if diff <= tolerance:
                _commit(staged, out_path)
                return ExportResult(out_path, exporter, opset, diff, time.perf_counter() - start,
                                    tuple(failures))
            failures.append(f"{exporter} exporter inaccurate: max abs diff {diff:.3g} > {tolerance:g}")
            log.warning("%s", failures[-1])
    raise ExportError(f"could not export {model_class} to ONNX: " + "; ".join(failures))


# --- steps ------------------------------------------------------------------------------------
def _example_args(adapter, batch: int) -> tuple[torch.Tensor, ...]:
    feeds = adapter.dummy_inputs(batch=batch, seed=0)
    return tuple(torch.from_numpy(feeds[s.name]) for s in adapter.input_specs())


def _dynamic(adapter, dynamic_batch: bool) -> dict[str, dict[int, Axis]]:
    """Per input, {dim: Axis} of the axes exported symbolic (the batch only when `dynamic_batch`)."""
    return {name: {d: a for d, a in enumerate(axes) if a.dynamic and (dynamic_batch or a.name != "batch")}
            for name, axes in adapter.input_axes().items()}


def _dims(dynamic: dict[str, dict[int, Axis]]) -> dict[str, dict[int, Any]]:
    """torch.export Dims: one per axis name (shared across inputs); a multiple m is m * Dim."""
    made: dict[str, Any] = {}  # torch.export Dims (or multiples of one), by axis name
    out: dict[str, dict[int, Any]] = {}
    for name, axes in dynamic.items():
        for d, a in axes.items():
            if a.name not in made:
                m = a.multiple
                top = None if a.max is None else a.max // m
                base = torch.export.Dim(a.name if m == 1 else f"{a.name}_over_{m}", min=max(1, -(-a.min // m)),
                                        **({} if top is None else {"max": top}))
                made[a.name] = base if m == 1 else m * base
            out.setdefault(name, {})[d] = made[a.name]
    return out


def _check_sizes(adapter) -> dict[str, int]:
    """Another valid value of every dynamic non-batch axis: the second shape the export is checked at."""
    return {a.name: a.alternative() for axes in adapter.input_axes().values() for a in axes
            if a.dynamic and a.name != "batch"}


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """torch.export and torch.onnx print deprecation and registry warnings on every export; they
    say nothing to our users and would bury qcompile's own one-line messages on stderr."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(adapter, module: torch.nn.Module, exporter: str, opset: int, dynamic_batch: bool,
            tmp: Path) -> ir.Model:
    with _quiet_exporters():
        return _export_loud(adapter, module, exporter, opset, dynamic_batch, tmp)


def _export_loud(adapter, module: torch.nn.Module, exporter: str, opset: int, dynamic_batch: bool,
                 tmp: Path) -> ir.Model:
    specs = adapter.input_specs()
    names = [s.name for s in specs]
    outputs = list(adapter.output_names)
    args = _example_args(adapter, 2)  # batch 2: torch.export specialises size-1 axes
    dynamic = _dynamic(adapter, dynamic_batch)
    with torch.no_grad():
        if exporter == "dynamo":
            dims = _dims(dynamic)
            shapes = tuple(dims.get(s.name) or None for s in specs)
            if _takes_varargs(module):  # forward(self, *inputs): torch.export nests the shapes once
                shapes = (shapes,)
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False,
                                        custom_translation_table=_translation_fixes())
            return program.model
        axes = {name: {d: a.name for d, a in given.items()} for name, given in dynamic.items() if given}
        if dynamic_batch:
            axes.update({o: {0: "batch"} for o in outputs})
        path = tmp / "legacy" / "model.onnx"
        path.parent.mkdir()
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes=axes or None, do_constant_folding=True)
        return ir.load(path)


def _takes_varargs(module: torch.nn.Module) -> bool:
    params = list(inspect.signature(module.forward).parameters.values())
    return len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL


def _summary(exc: BaseException) -> str:
    """One line for a failure: the root cause (torch wraps it), ANSI colours removed, shortened."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _translation_fixes() -> dict:
    """Exporter op translations we override.

    onnxscript 0.7.2 translates `aten.squeeze.dim` to an unconditional Squeeze, but torch's
    `x.squeeze(1)` is a no-op when that axis is not 1 (PixArt's `hidden_states.squeeze(1)` on the
    token axis): onnxruntime then refuses the model. Squeeze only when the axis may be 1.
    """
    from onnxscript import opset18 as op

    def squeeze_dim(self, dim: int):
        if len(self.shape) == 0:
            return op.Identity(self)
        size = self.shape[dim]
        if isinstance(size, int) and size != 1:
            return op.Identity(self)
        return op.Squeeze(self, op.Constant(value_ints=[dim]))

    return {torch.ops.aten.squeeze.dim: squeeze_dim}


def _module_prefix(adapter, export_module: torch.nn.Module) -> str:
    """Where the adapter's diffusers module sits inside the export wrapper ("model" usually)."""
    for name, sub in export_module.named_modules():
        if sub is adapter.module:
            return name
    return ""


def _relative(path: str, prefix: str, known: set[str]) -> str:
    """`path` (from the wrapper's root) as a path inside the adapter's module, "" when unknown.

    Dynamo scopes are full paths ("model.down_blocks.0..."). Legacy scopes follow the call stack:
    when the wrapper calls a method other than forward (AutoencoderKL.encode) the module's own
    level is missing ("encoder.conv_in"), so a path already inside the module is accepted as is.
    """
    if prefix and path == prefix:
        return ""
    if prefix and path.startswith(prefix + "."):
        inner = path[len(prefix) + 1:]
        if inner in known:
            return inner
    return path if path in known and path else ""


def _dynamo_scope(node: ir.Node) -> str:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return ""
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    # the last entry names the aten op; the one before it is the innermost module
    modules = [s for s in scopes[:-1] if s]
    return modules[-1] if modules else ""


def _legacy_scope(node: ir.Node) -> str:
    # legacy names look like "/model/down_blocks.0/attentions.0/proj_in/Conv"
    parts = [p for p in (node.name or "").split("/") if p]
    return ".".join(parts[:-1])


def _stamp(model: ir.Model, adapter, module: torch.nn.Module, exporter: str) -> None:
    """Give each node a unique name and its torch module path (`qcompile.module`)."""
    prefix = _module_prefix(adapter, module)
    known = {name for name, _ in adapter.module.named_modules()}
    seen: set[str] = set()
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        scope = _dynamo_scope(node) if exporter == "dynamo" else _legacy_scope(node)
        node.metadata_props[MODULE_KEY] = _relative(scope, prefix, known)
        for key in _DROPPED_METADATA:
            node.metadata_props.pop(key, None)
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    model.metadata_props["qcompile.exporter"] = exporter
    model.metadata_props["qcompile.model_class"] = type(adapter.module).__name__
    model.metadata_props["qcompile.family"] = adapter.family.value


def _save(model: ir.Model, path: Path) -> None:
    # Tensors under 1 KiB stay inline: onnxruntime's shape inference must read shape-like constants
    # (Unsqueeze axes, Reshape shapes) from the protobuf and refuses external ones.
    data = path.with_suffix(".data").name
    ir.save(model, path, external_data=data, size_threshold_bytes=1024)


def _release_weights(model: ir.Model) -> None:
    """The weights are in the saved file from here on. The exporter's rewrite rules (onnxscript pattern
    matchers, module-level objects) keep a reference to the last graph they matched, and through its
    initializers to torch's parameters: a whole fp32 copy of the weights (3.2 GiB for SD 1.5) alive for
    the rest of the build. Emptying the initializers lets those tensors go."""
    for value in model.graph.initializers.values():
        value.const_value = None


def _export_here(adapter, exporter: str, opset: int, dynamic_batch: bool, staged: Path,
                 checks: list[tuple[int, dict[str, int] | None]]) -> list[tuple[np.ndarray, ...]]:
    """Export in this process; torch's outputs on `checks`."""
    module = adapter.export_module().eval()
    model = _export(adapter, module, exporter, opset, dynamic_batch, staged.parent)
    _stamp(model, adapter, module, exporter)
    _save(model, staged)
    _release_weights(model)
    del model
    return torch_outputs(adapter, module, checks)


def _checks(adapter, dynamic_batch: bool) -> list[tuple[int, dict[str, int] | None]]:
    """(batch, sizes) the export is checked at: batch 1 with the default sizes and batch 2 with
    another valid value of every dynamic axis (batch 2 alone for a static batch)."""
    return [(1, None), (2, _check_sizes(adapter))] if dynamic_batch else [(2, None)]


def _check_feeds(adapter, batch: int, sizes: dict[str, int] | None) -> dict[str, np.ndarray]:
    return adapter.dummy_inputs(batch=batch, seed=batch, sizes=sizes)


def torch_outputs(adapter, module: torch.nn.Module,
                  checks: list[tuple[int, dict[str, int] | None]]) -> list[tuple[np.ndarray, ...]]:
    """The module's outputs (float32 numpy) on each check's inputs."""
    result = []
    for batch, sizes in checks:
        feeds = _check_feeds(adapter, batch, sizes)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[s.name]) for s in adapter.input_specs()))
        want = want if isinstance(want, (tuple, list)) else (want,)
        result.append(tuple(w.detach().float().numpy() for w in want))
    return result


def _verify(adapter, path: Path, checks: list[tuple[int, dict[str, int] | None]],
            wanted: list[tuple[np.ndarray, ...]]) -> float:
    """Max abs difference between onnxruntime (CPU EP) and torch's outputs over all checks."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for (batch, sizes), want in zip(checks, wanted, strict=True):
        got = session.run(list(adapter.output_names), _check_feeds(adapter, batch, sizes))
        for name, g, w in zip(adapter.output_names, got, want, strict=True):
            if g.shape != w.shape:
                raise ExportError(f"output {name} has shape {g.shape} in onnxruntime, {w.shape} in torch "
                                  f"(batch {batch}, sizes {sizes or 'default'})")
            worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))))
    return worst


def _commit(staged: Path, out_path: Path) -> None:
    """Move `<stem>.data` then `<stem>.onnx` into place; an old .onnx is removed first."""
    data = out_path.with_suffix(".data")
    if out_path.exists():
        out_path.unlink()
    os.replace(staged.with_suffix(".data"), data)  # the staging folder is beside out_path: same disk
    os.replace(staged, out_path)
