"""Run a QNN artifact as the model it was built from: host embedding on the CPU, the rest on HTP.

The device graphs have a static batch: a larger batch runs in chunks of it, the last chunk padded
by repeating its final sample. The host model (the timestep embedding, float) runs in onnxruntime
on the CPU and feeds its outputs to the device graph by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qcompile.runtime import BucketRunner, make_session, static_chunks
from qcompile.targets.qnn import ep

HOST_FILE = "host_time_embedding.onnx"


class QnnRunner(BucketRunner):
    def __init__(self, paths: Sequence[Path], *, host: Path | None = None, bucket_edges: Sequence[float] = (),
                 timestep_name: str | None = None, sample_name: str | None = None, htp: bool = True,
                 htp_arch: int | None = None):
        super().__init__(len(paths), bucket_edges=bucket_edges, timestep_name=timestep_name, sample_name=sample_name)
        self.htp = htp
        self.htp_arch = htp_arch
        self.paths = [Path(p) for p in paths]
        self.sessions = [ep.htp_session(Path(p), arch=htp_arch) if htp else make_session(Path(p)) for p in paths]
        self.host = make_session(host) if host is not None else None
        device_inputs = self.sessions[0].get_inputs()
        self.batch = next((i.shape[0] for i in device_inputs if i.shape and isinstance(i.shape[0], int)), 1)
        self.output_name = self.sessions[0].get_outputs()[0].name
        host_inputs = [i.name for i in self.host.get_inputs()] if self.host is not None else []
        self.host_outputs = [o.name for o in self.host.get_outputs()] if self.host is not None else []
        names = [i.name for i in device_inputs if i.name not in self.host_outputs]
        self.input_names = tuple(dict.fromkeys([*names, *host_inputs]))
        self._device_names = [i.name for i in device_inputs]

    def run_bucket(self, bucket: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        key = self.sample_name if self.sample_name in feed else next(k for k, v in feed.items() if v.ndim)
        rows = {k for k, v in feed.items() if v.ndim and len(v) == len(feed[key])}  # not Flux's ids, say
        parts = [self.run_chunk(bucket, chunk)[:count] for chunk, count in static_chunks(feed, self.batch, rows)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def device_feed(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The device graph's inputs for one static-batch chunk (host embedding computed here)."""
        feed = dict(chunk)
        if self.host is not None:
            host_in = {i.name: chunk[i.name] for i in self.host.get_inputs()}
            feed.update(zip(self.host_outputs, self.host.run(self.host_outputs, host_in), strict=True))
        return {k: np.ascontiguousarray(feed[k], np.float32 if feed[k].dtype == np.float64 else None)
                for k in self._device_names}

    def run_chunk(self, bucket: int, chunk: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[bucket].run([self.output_name], self.device_feed(chunk))[0]

    def session(self, bucket: int) -> ort.InferenceSession:
        return self.sessions[bucket]
