"""The artifact folder's files besides the manifest (qcompile/manifest.py): report names, tool versions,
fingerprints."""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

import qcompile

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
TOOLS = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy")


def tool_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    out = {"qcompile": qcompile.__version__}
    for name in (*TOOLS, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def file_fingerprint(paths: Iterable[Path], chunk: int = 16 << 20) -> str:
    """sha256 over the files' bytes, streamed (multi-GB weight files never sit in memory)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()


def arrays_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def files_size(folder: Path, names: Iterable[str]) -> int:
    return sum((folder / n).stat().st_size for n in set(names))
