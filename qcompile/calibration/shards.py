"""Calibration in shards, merged exactly: `qcompile calibrate --shard I/N` and `qcompile merge-cache`.

A calibration's statistics come from forward passes over batches of recorded rows (`stats.py`), and
its statistics merge exactly (counts and histograms add, ranges take min/max). Shard I of N records
the same recording as a whole calibration would (recordings are seeded, so every machine records the
same rows), runs the I-th contiguous run of its batches, numbered in the order a whole calibration
runs them and split so each shard gets about rows/N rows, and writes a shard cache: its statistics
and, for the recording, a digest of its content. Only shard 1 keeps the recording itself, so the
other shards ship statistics alone. Because each batch runs exactly as in the whole calibration (same
rows together, same segments), the merged statistics equal the whole's bit for bit.

`merge_shards` refuses, in one line and before writing anything, shards of different graphs,
settings, recordings or splits, and a set of shards that overlaps or misses some of 1..N. A shard
cache is never used as a cache by a build (`CalibrationCache.open` refuses it): it holds only part
of the statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.artifact import arrays_fingerprint
from qcompile.calibration.cache import META, RECORDING_DIR, STATS, CalibrationCache, _file_digest
from qcompile.calibration.recorder import Recording
from qcompile.calibration.stats import StatsTable
from qcompile.errors import UserError


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--shard {text}: expected I/N (shard I of N, e.g. 1/4)") from None
        if not 1 <= i <= n:
            raise UserError(f"--shard {text}: I must be between 1 and N")
        return cls(i, n)

    def describe(self) -> str:
        return f"{self.index}/{self.count}"

    def batches(self, rows: list[int]) -> range:
        """This shard's contiguous run of batches: those whose first row falls in the I-th N-th of
        all rows (a deterministic split every shard computes alike)."""
        total = sum(rows)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if rows else np.zeros(0, np.int64)
        lo, hi = (total * (self.index - 1)) // self.count, (total * self.index) // self.count
        mine = np.nonzero((starts >= lo) & (starts < hi))[0]
        return range(int(mine[0]), int(mine[-1]) + 1) if len(mine) else range(0)

    def meta(self, recording: Recording, rows: list[int]) -> dict[str, Any]:
        mine = self.batches(rows)
        return {"index": self.index, "count": self.count, "batches": [mine.start, mine.stop],
                "total_batches": len(rows), "rows": sum(rows[i] for i in mine),
                "recording_content": recording_content(recording)}


def recording_content(recording: Recording) -> str:
    """Digest of what a recording holds (its description and every array), not of its files' bytes
    (.npz files carry write times): two machines recording the same rows give the same digest."""
    parts = [json.dumps(recording.meta, sort_keys=True)]
    for name in recording.meta["shards"]:
        with np.load(recording.folder / name) as data:
            parts.append(arrays_fingerprint({k: data[k] for k in data.files}))
    return arrays_fingerprint({"parts": np.frombuffer("\n".join(parts).encode(), np.uint8)})


def content_digest(cache: CalibrationCache) -> str:
    """Digest of a cache's content: its description (less the file fingerprints), its statistics and
    its recording. Equal digests mean equal caches, whatever the files' write times."""
    meta = {k: v for k, v in cache.meta.items() if k not in ("fingerprints", "shard")}
    meta["graph"] = cache.meta["fingerprints"]["graph"]
    with np.load(cache.folder / STATS) as data:
        stats = arrays_fingerprint({k: data[k] for k in data.files})
    parts = [json.dumps(meta, sort_keys=True), stats, recording_content(cache.recording())]
    return arrays_fingerprint({"parts": np.frombuffer("\n".join(parts).encode(), np.uint8)})


def _open_shard(folder: Path) -> CalibrationCache:
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
        meta["fingerprints"]["graph"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"merge-cache {folder}: not a calibration shard (no readable {META})") from None
    if "shard" not in meta:
        raise UserError(f"merge-cache {folder}: a whole calibration cache, not a shard of one "
                        "(made without --shard)")
    if _file_digest(Path(folder) / STATS) != meta["fingerprints"].get("stats"):
        raise UserError(f"merge-cache {folder}: {STATS} is missing or changed since the shard was written")
    return CalibrationCache(Path(folder), meta)


# What every shard of one calibration shares, with the words naming it in a refusal.
_SAME = {"graph": lambda m: m["fingerprints"]["graph"], "settings": lambda m: m["settings"],
         "recording": lambda m: m["shard"]["recording_content"], "calibration source": lambda m: m["source"],
         "shard count": lambda m: m["shard"]["count"], "batch split": lambda m: m["shard"]["total_batches"],
         "tensors": lambda m: m["tensors"], "timesteps": lambda m: m["timesteps"]}


def check_shards(shards: list[CalibrationCache]) -> None:
    """One line naming the first difference: shards of another graph, settings or recording, and
    overlapping or missing shards."""
    first = shards[0]
    for other in shards[1:]:
        for what, get in _SAME.items():
            if get(other.meta) != get(first.meta):
                raise UserError(f"merge-cache {other.folder}: not the same {what} as {first.folder}; "
                                "only the shards of one calibration merge")
    seen: dict[int, Path] = {}
    for s in shards:
        i = s.meta["shard"]["index"]
        if i in seen:
            raise UserError(f"merge-cache {s.folder}: overlaps {seen[i]} (both are shard "
                            f"{i}/{s.meta['shard']['count']}, the same rows)")
        seen[i] = s.folder
    n = first.meta["shard"]["count"]
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in seen]
    if missing:
        raise UserError(f"merge-cache: missing shard {', '.join(missing)} (its rows would be left out)")


def merge_shards(out: Path, folders: list[Path]) -> CalibrationCache:
    """The whole calibration cache from all its shards, into the new folder `out` (built beside it
    and renamed into place: a failure leaves no cache)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"merge-cache {out}: already exists and is not empty; choose a new folder")
    if not folders:
        raise UserError("merge-cache: no shards given")
    shards = [_open_shard(Path(f)) for f in folders]
    check_shards(shards)
    shards.sort(key=lambda s: s.meta["shard"]["index"])
    carrier = shards[0]
    recording = Recording.open(carrier.folder / RECORDING_DIR) if (carrier.folder / RECORDING_DIR).is_dir() else None
    if recording is None or recording_content(recording) != carrier.meta["shard"]["recording_content"]:
        raise UserError(f"merge-cache {carrier.folder}: shard 1 carries the recording, and its recording is "
                        "missing or changed since the shard was written")
    tables = [s.table() for s in shards]
    merged = tables[0]
    for table in tables[1:]:
        merged = merged.merge(table)
    order = [t["name"] for t in carrier.meta["tensors"]]
    table = StatsTable(merged.timesteps, {name: merged.tensors[name] for name in order})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent))
    try:
        shutil.copytree(recording.folder, tmp / RECORDING_DIR)
        CalibrationCache.create(tmp, graph_fingerprint=carrier.graph_fingerprint,
                                recording=Recording.open(tmp / RECORDING_DIR), table=table,
                                source=carrier.meta["source"],
                                producers={t["name"]: t["producer"] for t in carrier.meta["tensors"]})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CalibrationCache.open(out)
