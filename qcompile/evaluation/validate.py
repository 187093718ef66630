"""Teacher-forced validation: the float model and the artifact on the same held-back inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
from qcompile.calibration.shapes import concrete_shapes
from qcompile.evaluation.metrics import cosine, sqnr_db
from qcompile.target import Runner


@dataclass(frozen=True)
class StepResult:
    timestep: float | None
    bucket: int
    eps_sqnr_db: float
    eps_cos: float
    cfg_gap_ratio: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"timestep": self.timestep, "bucket": self.bucket, "eps_sqnr_db": round(self.eps_sqnr_db, 4),
                "eps_cos": round(self.eps_cos, 6), "cfg_gap_ratio": self.cfg_gap_ratio}


# Rows validated per run: at most VALIDATION_BATCH, fewer when the model's largest tensor for that many
# rows would pass VALIDATION_TENSOR_BYTES (an SD UNet's attention scores at 64x64 latents are 512 MiB a
# row: four rows at once held 12 GiB in onnxruntime).
VALIDATION_BATCH = 4
VALIDATION_TENSOR_BYTES = 256 << 20


def validation_batch(onnx_path: Path, inputs: InputSet) -> int:
    """Rows per run for `inputs` on the float model at `onnx_path` (see VALIDATION_TENSOR_BYTES)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = [o for node in model.graph.node for o in node.output if o]  # value_info may be absent
    sizes = [4 * math.prod(s) for s in concrete_shapes(model, inputs.row_shapes(), names).values() if s is not None]
    largest = max(sizes, default=0)
    return max(1, min(VALIDATION_BATCH, VALIDATION_TENSOR_BYTES // largest if largest else VALIDATION_BATCH))


def run_inputs(runner: Runner, inputs: InputSet, *, batch: int = 4, desc: str = "running") -> np.ndarray:
    """The runner's first output for every input row, in row order."""
    parts = [np.asarray(runner.run(feed)) for _, feed in tqdm(list(inputs.batches(batch)), desc=desc, unit="batch",
                                                               leave=False)]
    return np.concatenate(parts)


def compare_outputs(reference: np.ndarray, artifact: Runner, inputs: InputSet, *, batch: int = 4,
                    bucket_of=lambda t: 0) -> list[StepResult]:
    """One result per input row against the float model's `reference` outputs (from `run_inputs`),
    ordered as a sampler visits timesteps (high to low)."""
    test = run_inputs(artifact, inputs, batch=batch, desc="validating")
    results: list[StepResult] = []
    for i in range(inputs.count):
        t = None if inputs.timesteps is None else float(inputs.timesteps[i])
        results.append(StepResult(t, bucket_of(t) if t is not None else 0,
                                  sqnr_db(reference[i], test[i]), cosine(reference[i], test[i])))
    if inputs.timesteps is not None:
        results.sort(key=lambda r: -r.timestep)
    return results


def compare_on_inputs(reference: Runner, artifact: Runner, inputs: InputSet, *, batch: int = 4,
                      bucket_of=lambda t: 0) -> list[StepResult]:
    """`compare_outputs` with the float model run first and released before the artifact runs: the
    two are never loaded together (for an SD-class model, a whole fp32 copy of the weights)."""
    expected = run_inputs(reference, inputs, batch=batch, desc="float model")
    reference.release()
    return compare_outputs(expected, artifact, inputs, batch=batch, bucket_of=bucket_of)
