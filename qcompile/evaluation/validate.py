"""Teacher-forced validation: the float model and the artifact on the same held-back inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
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


def compare_on_inputs(reference: Runner, artifact: Runner, inputs: InputSet, *, batch: int = 4,
                      bucket_of=lambda t: 0) -> list[StepResult]:
    """One result per input sample, ordered as a sampler visits timesteps (high to low)."""
    results: list[StepResult] = []
    for sl, feed in tqdm(list(inputs.batches(batch)), desc="validating", unit="batch", leave=False):
        ref = np.asarray(reference.run(feed))
        test = np.asarray(artifact.run(feed))
        for i in range(sl.stop - sl.start):
            t = None if inputs.timesteps is None else float(inputs.timesteps[sl.start + i])
            results.append(StepResult(t, bucket_of(t) if t is not None else 0,
                                      sqnr_db(ref[i], test[i]), cosine(ref[i], test[i])))
    if inputs.timesteps is not None:
        results.sort(key=lambda r: -r.timestep)
    return results
