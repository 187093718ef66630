"""Lazy imports of the optional LiteRT package, so a missing extra gives one clear error, not an ImportError."""

from __future__ import annotations

from types import ModuleType

from qcompile.errors import MissingDependencyError

PURPOSE = "the tflite targets"


def schema() -> ModuleType:
    """`ai_edge_litert.schema_py_generated`: the TFLite flatbuffer object API."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise MissingDependencyError("ai-edge-litert", "tflite", PURPOSE) from exc
    return schema_py_generated


def flatbuffers() -> ModuleType:
    try:
        import flatbuffers as fb
    except ImportError as exc:
        raise MissingDependencyError("flatbuffers", "tflite", PURPOSE) from exc
    return fb


def interpreter_module() -> ModuleType:
    """`ai_edge_litert.interpreter`, or the legacy `tflite_runtime.interpreter` as a fallback."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise MissingDependencyError("ai-edge-litert", "tflite", PURPOSE) from exc
    return interpreter


def litert_version() -> str:
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:  # not installed from a distribution (or not at all)
        return "unknown"
