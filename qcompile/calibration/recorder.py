"""Recordings: the denoiser's real inputs at every call of a sampling loop, keyed by timestep value.

A recording is a folder of bounded `.npz` shards plus `recording.json`. Each row is one model input
(one latent of a batch) with the timestep value it was called at, the sampling step, the call
index, and which CFG half it belongs to (0 uncond, 1 cond, -1 no CFG). Keying by the timestep
*value* rather than a call counter keeps the statistics meaningful for any scheduler: second-order
solvers call the model at intermediate timesteps, split CFG doubles the calls, and a recording
made with 20 steps serves a deployment with 50.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.atomic import atomic_path, write_json
from qcompile.calibration.inputs import InputSet
from qcompile.config import SamplerSettings
from qcompile.errors import UserError
from qcompile.evaluation.sampling import DenoiserCall, sample

RECORDING_FORMAT = 1
RECORDING_JSON = "recording.json"
CFG_UNCOND, CFG_COND, CFG_NONE = 0, 1, -1
# Rows per shard: bounds memory while recording and while replaying.
SHARD_ROWS = 512


@dataclass(frozen=True)
class RowMeta:
    timestep: np.ndarray  # (rows,) float32
    step: np.ndarray  # (rows,) int32
    call: np.ndarray  # (rows,) int32
    cfg_half: np.ndarray  # (rows,) int8


class RecordingWriter:
    """Buffers rows and writes a shard whenever SHARD_ROWS are collected."""

    def __init__(self, folder: Path, *, unbatched: frozenset[str] = frozenset(), shard_rows: int = SHARD_ROWS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.unbatched = unbatched
        self.shard_rows = shard_rows
        self.buffer: dict[str, list[np.ndarray]] = {}
        self.rows = 0
        self.total = 0
        self.shards: list[str] = []
        self.calls = 0
        self.fixed: dict[str, np.ndarray] = {}

    def add(self, inputs: dict[str, np.ndarray], timestep: float, *, step: int, cfg: bool) -> None:
        batched = {k: v for k, v in inputs.items() if k not in self.unbatched}
        n = len(next(iter(batched.values())))
        half = np.full(n, CFG_NONE, np.int8)
        if cfg:
            half[: n // 2], half[n // 2:] = CFG_UNCOND, CFG_COND
        meta = {"_timestep": np.full(n, timestep, np.float32), "_step": np.full(n, step, np.int32),
                "_call": np.full(n, self.calls, np.int32), "_cfg_half": half}
        for k, v in {**batched, **meta}.items():
            self.buffer.setdefault(k, []).append(np.asarray(v))
        for k in self.unbatched:
            self.fixed[k] = np.asarray(inputs[k])
        self.calls += 1
        self.rows += n
        if self.rows >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        name = f"shard_{len(self.shards):05d}.npz"
        arrays = {k: np.concatenate(v) for k, v in self.buffer.items()}
        arrays.update({f"_fixed_{k}": v for k, v in self.fixed.items()})
        with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        self.shards.append(name)
        self.total += self.rows
        self.buffer, self.rows = {}, 0

    def close(self, source: dict[str, Any]) -> Recording:
        self._flush()
        write_json(self.folder / RECORDING_JSON, {"format": RECORDING_FORMAT, "source": source, "rows": self.total,
                                                  "calls": self.calls, "shards": self.shards})
        return Recording.open(self.folder)


@dataclass(frozen=True)
class Recording:
    folder: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, folder: Path) -> Recording:
        path = Path(folder) / RECORDING_JSON
        if not path.is_file():
            raise UserError(f"{folder}: not a qcompile recording (no {RECORDING_JSON})")
        return cls(Path(folder), json.loads(path.read_text()))

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    def shards(self) -> Iterator[tuple[InputSet, RowMeta]]:
        """Each shard as an InputSet (timesteps per row) plus the row metadata."""
        for name in self.meta["shards"]:
            with np.load(self.folder / name) as data:
                arrays = {k: data[k] for k in data.files if not k.startswith("_")}
                fixed = {k[len("_fixed_"):]: data[k] for k in data.files if k.startswith("_fixed_")}
                meta = RowMeta(data["_timestep"], data["_step"], data["_call"], data["_cfg_half"])
            arrays.update(fixed)
            yield InputSet(arrays, meta.timestep, frozenset(fixed)), meta

    def spread_rows(self, count: int) -> InputSet:
        """About `count` rows spread evenly over the whole recording (all timesteps, both CFG halves)."""
        every = max(1, self.rows // max(count, 1))
        parts, seen = [], 0
        for inputs, _ in self.shards():
            idx = np.arange((-seen) % every, inputs.count, every)
            seen += inputs.count
            if len(idx):
                parts.append(InputSet(inputs.take(idx), inputs.timesteps[idx], inputs.unbatched))
        arrays = {k: (parts[0].arrays[k] if k in parts[0].unbatched else np.concatenate([p.arrays[k] for p in parts]))
                  for k in parts[0].arrays}
        return InputSet(arrays, np.concatenate([p.timesteps for p in parts]), parts[0].unbatched)

    def timestep_columns(self) -> Iterator[np.ndarray]:
        """Each file's timestep column (only that column is read, not the inputs)."""
        for name in self.meta["shards"]:
            with np.load(self.folder / name) as data:
                yield data["_timestep"]

    def timesteps(self) -> np.ndarray:
        """Unique timestep values, descending (sampling order)."""
        values = list(self.timestep_columns())
        return np.unique(np.concatenate(values))[::-1] if values else np.zeros(0)


def record_input_set(inputs: InputSet, folder: Path, source: dict[str, Any]) -> Recording:
    """A recording of given inputs (synthetic or a user's file): one call per timestep value."""
    writer = RecordingWriter(folder, unbatched=inputs.unbatched)
    if inputs.timesteps is None:
        writer.add(inputs.arrays, float("nan"), step=0, cfg=False)
        return writer.close(source)
    for step, t in enumerate(np.unique(inputs.timesteps)[::-1]):
        idx = np.nonzero(inputs.timesteps == t)[0]
        rows = {k: (v if k in inputs.unbatched else v[idx]) for k, v in inputs.arrays.items()}
        writer.add(rows, float(t), step=step, cfg=False)
    return writer.close(source)


def record_sampling(denoiser, setup, settings: SamplerSettings, count: int, folder: Path, *, sample_name: str,
                    timestep_name: str, source: dict[str, Any]) -> Recording:
    """Run the model's own sampling loop for `count` samples (labels cycling over classes) and record
    every denoiser call. `denoiser(inputs: dict) -> eps` is the float model."""
    labels = np.resize(setup.labels(1), count)
    cond, uncond = setup.conditioning(labels), setup.null_conditioning(count)
    writer = RecordingWriter(folder)

    def model(x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        return denoiser({sample_name: x, timestep_name: t, setup.cond_input: c})

    def hook(call: DenoiserCall) -> None:
        writer.add({sample_name: call.sample, timestep_name: np.full(len(call.sample), call.timestep, np.float32),
                    setup.cond_input: call.cond}, call.timestep, step=call.step, cfg=call.cfg)

    sample(model, settings, cond=cond, uncond=uncond, latent_shape=(count, *setup.latent_shape),
           scheduler_config=setup.scheduler_config, hook=hook)
    return writer.close({**source, "scheduler": settings.scheduler.value, "steps": settings.steps,
                         "guidance": settings.guidance, "seed": settings.seed, "samples": count})
