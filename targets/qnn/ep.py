"""The QNN execution provider (a plugin EP in onnxruntime-qnn) and its HTP backend: sessions on the
x86_64 HTP simulator, with CPU fallback off so a session either runs everything on HTP or fails.

The plugin is attached through `register_execution_provider_library` and `add_provider_for_devices`;
the older `providers=[("QNNExecutionProvider", ...)]` form silently runs on the CPU (ENVIRONMENT.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import ModuleType

import onnxruntime as ort

from qcompile.errors import MissingDependencyError, UserError

EP_NAME = "QNNExecutionProvider"
PURPOSE = "the qnn targets"


def qnn_module() -> ModuleType:
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime-qnn", "qnn", PURPOSE) from exc
    return onnxruntime_qnn


def available() -> tuple[bool, str]:
    """(usable, why not): for tests and tools that skip without the simulator."""
    try:
        _devices()
    except UserError as exc:
        return False, str(exc)
    return True, ""


@cache
def _devices() -> tuple:
    qnn = qnn_module()
    if EP_NAME not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
    devices = tuple(d for d in ort.get_ep_devices() if d.ep_name == EP_NAME)
    if not devices:
        raise UserError(f"{PURPOSE}: onnxruntime-qnn registered no {EP_NAME} device")
    return devices


def runtime_version() -> str:
    return f"onnxruntime-qnn {qnn_module().__version__}"


def htp_session(model: Path | bytes, *, options: Mapping[str, str] | None = None,
                session_config: Mapping[str, str] | None = None, quiet: bool = False,
                arch: int | None = None) -> ort.InferenceSession:
    """A session whose every node runs on the HTP backend; fails rather than fall back to the CPU.
    `quiet`: a refusal the caller expects and reports itself is not also logged by onnxruntime.
    `arch`: the HTP architecture to compile for (and simulate); None: the backend's default."""
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, value)
    provider = {"backend_path": qnn_module().get_qnn_htp_path(), **(options or {})}
    if arch is not None:
        provider["htp_arch"] = str(arch)
    so.add_provider_for_devices(list(_devices()), provider)
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, so)
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
        name = model if isinstance(model, Path) else "model"
        raise UserError(f"qnn: {name}: the HTP backend refused the graph: {str(exc).splitlines()[0][:300]}") from exc
