"""onnxruntime sessions and the ONNX runner that acts as a denoiser."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def make_session(path: Path, *, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """Runs one or more ONNX models (one per timestep bucket) as the model they were built from.

    `bucket_edges` are the K-1 inner timestep boundaries (ascending); a timestep t goes to the first
    bucket whose upper edge exceeds it. With one model there are no edges.
    """

    def __init__(self, paths: Sequence[Path], *, bucket_edges: Sequence[float] = (),
                 timestep_name: str | None = None, sample_name: str | None = None):
        if len(paths) != len(bucket_edges) + 1:
            raise ValueError("one model per bucket: len(paths) must be len(bucket_edges) + 1")
        self.sessions = [make_session(p) for p in paths]
        self.bucket_edges = np.asarray(bucket_edges, np.float64)
        self.timestep_name = timestep_name
        self.sample_name = sample_name
        self.input_names = tuple(i.name for i in self.sessions[0].get_inputs())
        self.output_names = tuple(o.name for o in self.sessions[0].get_outputs())

    def bucket_of(self, timestep: float) -> int:
        return int(np.searchsorted(self.bucket_edges, timestep, side="right"))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """First output for a batch; a batch spanning several buckets is split by bucket."""
        feed = {k: inputs[k] for k in self.input_names}
        if len(self.sessions) == 1 or self.timestep_name is None:
            return self.sessions[0].run(self.output_names[:1], feed)[0]
        t = np.broadcast_to(np.asarray(feed[self.timestep_name]).reshape(-1),
                            (len(next(iter(feed.values()))),))
        buckets = np.searchsorted(self.bucket_edges, t, side="right")
        out = None
        for b in np.unique(buckets):
            idx = np.nonzero(buckets == b)[0]
            part = self.sessions[b].run(self.output_names[:1], {k: v[idx] for k, v in feed.items()})[0]
            if out is None:
                out = np.empty((len(t), *part.shape[1:]), part.dtype)
            out[idx] = part
        return out

    def __call__(self, sample: np.ndarray, timestep: np.ndarray | float, **cond: np.ndarray) -> np.ndarray:
        if self.sample_name is None or self.timestep_name is None:
            raise TypeError("this model has no sample/timestep inputs: call run() with all inputs")
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (len(sample),)).copy()
        return self.run({self.sample_name: sample, self.timestep_name: t, **cond})
