"""onnxruntime sessions and the ONNX runner that acts as a denoiser."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def make_session(path: Path, *, threads: int = 0, optimize: bool = True, arena: bool = True) -> ort.InferenceSession:
    """`arena=False` returns intermediate buffers to the system after each run (many sessions kept open
    at once would otherwise each hold their largest run's memory)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class BucketRunner:
    """Acts as the model an artifact was built from, routing each sample to its timestep bucket.

    `bucket_edges` are the K-1 inner timestep boundaries (ascending); a timestep t goes to the first
    bucket whose upper edge exceeds it. Subclasses set `input_names` and run one bucket's program.
    """

    input_names: tuple[str, ...]

    def __init__(self, buckets: int, *, bucket_edges: Sequence[float], timestep_name: str | None,
                 sample_name: str | None):
        if buckets != len(bucket_edges) + 1:
            raise ValueError(f"{buckets} programs for {len(bucket_edges) + 1} buckets")
        self.buckets = buckets
        self.bucket_edges = np.asarray(bucket_edges, np.float64)
        self.timestep_name = timestep_name
        self.sample_name = sample_name

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what the runner loaded (sessions, interpreters); a later run loads it again.
        The evaluation releases the float model before it runs the artifact, so the two are never
        in memory together."""

    def bucket_of(self, timestep: float) -> int:
        return int(np.searchsorted(self.bucket_edges, timestep, side="right"))

    def rows_of(self, bucket: int, count: int, timesteps: np.ndarray | None) -> np.ndarray:
        """Indices of the `count` rows (with `timesteps`, or None for models without one) that `bucket`
        runs: all of them when there is no timestep."""
        if timesteps is None:
            return np.arange(count)
        return np.nonzero(np.searchsorted(self.bucket_edges, np.asarray(timesteps, np.float64), side="right")
                          == bucket)[0]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """First output for a batch; a batch spanning several buckets is split by bucket (inputs
        without a batch axis, such as Flux's ids, go whole to every bucket)."""
        feed = {k: np.asarray(inputs[k]) for k in self.input_names}
        if self.buckets == 1 or self.timestep_name is None:
            return self.run_bucket(0, feed)
        n = len(feed[self.timestep_name].reshape(-1))
        buckets = np.searchsorted(self.bucket_edges, feed[self.timestep_name].reshape(-1), side="right")
        out = None
        for b in np.unique(buckets):
            idx = np.nonzero(buckets == b)[0]
            part = self.run_bucket(int(b), {k: v[idx] if v.ndim and len(v) == n else v for k, v in feed.items()})
            if out is None:
                out = np.empty((n, *part.shape[1:]), part.dtype)
            out[idx] = part
        return out

    def __call__(self, sample: np.ndarray, timestep: np.ndarray | float, **cond: np.ndarray) -> np.ndarray:
        if self.sample_name is None or self.timestep_name is None:
            raise TypeError("this model has no sample/timestep inputs: call run() with all inputs")
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (len(sample),)).copy()
        return self.run({self.sample_name: sample, self.timestep_name: t, **cond})


class OnnxRunner(BucketRunner):
    """One onnxruntime session per timestep bucket (one model file each), each opened on the bucket's
    first run: a pipeline pays only for the buckets its steps reach. `optimize=False` runs the graph
    node by node (FP8 Q/DQ: onnxruntime's CPU fusions have no float8 kernels)."""

    def __init__(self, paths: Sequence[Path], *, bucket_edges: Sequence[float] = (),
                 timestep_name: str | None = None, sample_name: str | None = None, optimize: bool = True):
        super().__init__(len(paths), bucket_edges=bucket_edges, timestep_name=timestep_name, sample_name=sample_name)
        self.paths = tuple(Path(p) for p in paths)
        self.optimize = optimize
        self.sessions: list[ort.InferenceSession | None] = [None] * len(self.paths)
        graph = onnx.load(str(self.paths[0]), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        self.input_names = tuple(i.name for i in graph.input if i.name not in initializers)
        self.output_names = tuple(o.name for o in graph.output)

    def session(self, bucket: int) -> ort.InferenceSession:
        if self.sessions[bucket] is None:
            self.sessions[bucket] = make_session(self.paths[bucket], optimize=self.optimize)
        return self.sessions[bucket]

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session(bucket).run(self.output_names[:1], feed)[0]

    def release(self) -> None:
        self.sessions = [None] * len(self.paths)


def pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """`x` with its last sample repeated up to `batch` rows (a static-batch graph's last chunk)."""
    if len(x) >= batch:
        return x
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])


def static_chunks(feed: dict[str, np.ndarray], batch: int, batched: set[str]):
    """(chunk, rows in it): `feed` cut into chunks of a static-batch model's `batch`, the last padded by
    repeating its final row. The `batched` inputs with the most rows are cut; every other input (Flux's
    position ids, say) goes whole into every chunk."""
    n = max((len(feed[k]) for k in batched if feed[k].ndim), default=batch)
    for start in range(0, n, batch):
        count = min(batch, n - start)
        chunk = dict(feed)
        for k in batched:
            v = feed[k]
            if v.ndim and len(v) == n:
                chunk[k] = pad_batch(v[start:start + count], batch)
        yield chunk, count
