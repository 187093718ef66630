"""The artifact folder contract: manifest.json and the fingerprints it carries (README, DESIGN §4)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import qcompile
from qcompile.errors import UserError

MANIFEST = "manifest.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
MANIFEST_FORMAT = 1
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


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not a qcompile artifact folder (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
