"""The artifact folder's files besides the manifest (qcompile/manifest.py): report names, tool versions,
fingerprints."""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

import qcompile
from qcompile.atomic import write_text

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
MODEL_CONFIG = "model_config.json"
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


def write_model_config(module, folder: Path) -> str:
    """Write the component's own config into the artifact (diffusers' config.json: `_class_name` and
    every field), so `qcompile.load` can stand the artifact in for the component with nothing else at
    hand; returns its name relative to `folder`."""
    from diffusers.configuration_utils import ConfigMixin

    # diffusers models carry their config themselves; transformers models (text encoders) in `.config`
    text = module.to_json_string() if isinstance(module, ConfigMixin) else module.config.to_json_string()
    write_text(Path(folder) / MODEL_CONFIG, text)
    return MODEL_CONFIG
