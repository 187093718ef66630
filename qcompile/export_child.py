"""Export a large model in a child process, so that torch's copy of the weights ends with it.

Why: after `torch.onnx.export` returns, torch's parameters stay referenced from inside the export
machinery (module-level pattern matchers, export caches), and a diffusers model loaded from
safetensors shares one memory-mapped storage for the whole file: one surviving tensor keeps every
page of it resident. For SD 1.5 that is 3.2 GiB held through calibration, quantization and
evaluation. A child process loads the model from the same source, exports it, records torch's
outputs on the check inputs and exits; everything it held goes with it. The parent then checks the
saved ONNX model against those outputs in onnxruntime, with no torch weights beside the session.

The child is started only for models whose weights are large enough for the copy to matter
(`CHILD_EXPORT_BYTES`): a process start re-imports torch and diffusers (several seconds), which would
dominate the export of a small model.

    python -m qcompile.export_child SPEC.json      # run by `export_onnx`, not by users
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Models with at least this many bytes of parameters and buffers export in a child process.
CHILD_EXPORT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ModelSource:
    """What `models.source.resolve_model` takes: a child process loads the same model from it."""

    model: str
    component: str | None
    seed: int


@dataclass(frozen=True)
class ChildExport:
    """One exporter's attempt in a child process."""

    source: ModelSource
    exporter: str
    opset: int
    dynamic_batch: bool
    onnx_path: str  # where the child saves the model (+ its .data)
    outputs_path: str  # torch's outputs on the check inputs (.npz)
    error_path: str  # one line: why the export failed


class ChildKilled(RuntimeError):
    """The export process was killed (out of memory, most likely): another exporter would be too."""


def exports_in_child(adapter, source: ModelSource | None, child_bytes: int = CHILD_EXPORT_BYTES) -> bool:
    """Whether `export_onnx` exports this model in a child process."""
    return source is not None and module_bytes(adapter.module) >= child_bytes


def module_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def export_in_child(job: ChildExport, checks) -> list[tuple[np.ndarray, ...]]:
    """Run `job` in a child process; torch's outputs on `checks` ((batch, sizes) pairs), in order.

    Raises RuntimeError with the child's one-line reason when it fails or dies."""
    spec = Path(job.outputs_path).with_suffix(".json")
    spec.write_text(json.dumps({"job": asdict(job), "checks": [[b, s] for b, s in checks]}))
    proc = subprocess.run([sys.executable, "-m", "qcompile.export_child", str(spec)], check=False)
    error = Path(job.error_path)
    if proc.returncode != 0:
        if error.is_file():
            raise RuntimeError(error.read_text().strip())
        if proc.returncode < 0:
            hint = " (out of memory?)" if proc.returncode == -9 else ""
            raise ChildKilled(f"the export process was killed by signal {-proc.returncode}{hint}")
        raise RuntimeError(f"the export process exited {proc.returncode} (its messages are above)")
    with np.load(job.outputs_path) as saved:
        return [tuple(saved[f"{i}/{k}"] for k in range(int(saved[f"{i}/count"]))) for i in range(len(checks))]


def _main(spec_path: Path) -> int:
    from qcompile import export
    from qcompile.models.source import resolve_model

    spec = json.loads(spec_path.read_text())
    job = ChildExport(source=ModelSource(**spec["job"].pop("source")), **spec["job"])
    checks = [(int(b), s) for b, s in spec["checks"]]
    try:
        adapter = resolve_model(job.source.model, job.source.component, seed=job.source.seed)
        module = adapter.export_module().eval()
        onnx_path = Path(job.onnx_path)
        model = export._export(adapter, module, job.exporter, job.opset, job.dynamic_batch, onnx_path.parent)
        export._stamp(model, adapter, module, job.exporter)
        export._save(model, onnx_path)
        del model
        outputs = export.torch_outputs(adapter, module, checks)
    except Exception as exc:  # the parent records it and tries the next exporter, as in-process
        Path(job.error_path).write_text(export._summary(exc))
        return 1
    arrays = {f"{i}/count": np.asarray(len(outs)) for i, outs in enumerate(outputs)}
    arrays.update({f"{i}/{k}": o for i, outs in enumerate(outputs) for k, o in enumerate(outs)})
    np.savez(job.outputs_path, **arrays)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    sys.exit(_main(Path(sys.argv[1])))
