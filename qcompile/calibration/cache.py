"""The calibration cache: statistics (not scales) per tensor per timestep, reusable across targets,
estimators and bucket counts.

Layout of a cache folder (`--calib-cache DIR`):
    meta.json      format, fingerprints (graph, recording, settings), timesteps, tensors, sample counts
    stats.npz      per tensor i: t{i}.count, t{i}.lo, t{i}.hi, t{i}.chan, t{i}.hist (one row per timestep)
    recording/     the recorded denoiser inputs the statistics came from

The cache is verified, not trusted: it is keyed by the fingerprint of the canonical float graph it was
computed on (a cache made for another graph is refused), its own fingerprint covers the content of
every file in it (statistics and recording, checked again when it is opened), and a table whose
arrays do not match its timesteps or tensors is refused in one line naming the cache.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.atomic import atomic_path, write_json
from qcompile.calibration.recorder import RECORDING_JSON, Recording
from qcompile.calibration.stats import BINS_PER_OCTAVE, LOG2_MAX, LOG2_MIN, StatsTable, TensorStats
from qcompile.errors import UserError

CACHE_FORMAT = 2
META = "meta.json"
STATS = "stats.npz"
RECORDING_DIR = "recording"
SETTINGS = {"observer": "minmax+chan_absmax+log2_hist", "log2_min": LOG2_MIN, "log2_max": LOG2_MAX,
            "bins_per_octave": BINS_PER_OCTAVE}


def _digest(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    from qcompile.artifact import file_fingerprint

    return file_fingerprint([path])


def recording_fingerprint(recording: Recording) -> str:
    h = hashlib.sha256((recording.folder / RECORDING_JSON).read_bytes())
    for name in recording.meta["shards"]:
        h.update((recording.folder / name).read_bytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class CalibrationCache:
    folder: Path
    meta: dict[str, Any]

    @property
    def graph_fingerprint(self) -> str:
        return self.meta["fingerprints"]["graph"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprints"]["cache"]

    @classmethod
    def exists(cls, folder: Path) -> bool:
        return (Path(folder) / META).is_file()

    @classmethod
    def open(cls, folder: Path, *, expect_graph: str | None = None) -> CalibrationCache:
        path = Path(folder) / META
        if not path.is_file():
            raise UserError(f"--calib-cache {folder}: not a calibration cache (no {META})")
        try:
            meta = json.loads(path.read_text())
            fingerprints = meta["fingerprints"]
            fmt = meta.get("format")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--calib-cache {folder}: {META} is not a calibration cache's ({type(exc).__name__})") \
                from None
        if fmt != CACHE_FORMAT:
            raise UserError(f"--calib-cache {folder}: cache format {fmt}, this qcompile reads "
                            f"{CACHE_FORMAT}; recalibrate into a new folder")
        if "shard" in meta:
            shard = meta["shard"]
            raise UserError(f"--calib-cache {folder}: shard {shard.get('index')}/{shard.get('count')} of a calibration "
                            "(statistics of part of the rows); merge all its shards first: qcompile merge-cache OUT "
                            "SHARD...")
        if expect_graph is not None and fingerprints["graph"] != expect_graph:
            raise UserError(f"--calib-cache {folder}: made for another graph ({fingerprints['graph'][:19]}…, "
                            f"this model is {expect_graph[:19]}…); use a new folder")
        cache = cls(Path(folder), meta)
        cache.verify()
        return cache

    def verify(self) -> None:
        """Every file's content against the fingerprints written with it (an edited, truncated or swapped
        file is refused, never silently used)."""
        fp = self.meta["fingerprints"]
        stats = self.folder / STATS
        if not stats.is_file():
            raise UserError(f"--calib-cache {self.folder}: {STATS} is missing")
        if _file_digest(stats) != fp.get("stats"):
            raise UserError(f"--calib-cache {self.folder}: {STATS} changed since the cache was written (its content "
                            "no longer matches the cache's fingerprint); recalibrate into a new folder")
        try:
            recording = self.recording()
            rec_fp = recording_fingerprint(recording)
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"--calib-cache {self.folder}: its recording is unreadable ({type(exc).__name__})") \
                from None
        if rec_fp != fp["recording"]:
            raise UserError(f"--calib-cache {self.folder}: its recording changed since the cache was written; "
                            "recalibrate into a new folder")

    @classmethod
    def create(cls, folder: Path, *, graph_fingerprint: str, recording: Recording, table: StatsTable,
               source: dict[str, Any], producers: dict[str, str] | None = None,
               shard: dict[str, Any] | None = None) -> CalibrationCache:
        """`producers` names, per tensor, the module path and op that computed it (for people); `shard`
        marks a shard cache (`shards.py`): part of the statistics, for `qcompile merge-cache` only."""
        folder = Path(folder)
        rec_fp = recording_fingerprint(recording)
        names = list(table.tensors)
        arrays = {}
        for i, name in enumerate(names):
            st = table.tensors[name]
            arrays.update({f"t{i}.count": st.count, f"t{i}.lo": st.lo, f"t{i}.hi": st.hi,
                           f"t{i}.chan": st.chan_absmax, f"t{i}.hist": st.hist})
        with atomic_path(folder / STATS) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        stats_fp = _file_digest(folder / STATS)
        settings_fp = _digest(json.dumps(SETTINGS, sort_keys=True))
        meta = {
            "format": CACHE_FORMAT,
            "fingerprints": {"graph": graph_fingerprint, "recording": rec_fp, "settings": settings_fp,
                             "stats": stats_fp, "cache": _digest(graph_fingerprint, rec_fp, settings_fp, stats_fp)},
            "source": source,
            "settings": SETTINGS,
            "timesteps": [None if np.isnan(t) else float(t) for t in table.timesteps],
            "tensors": [{"name": n, "channel_axis": table.tensors[n].channel_axis,
                         "producer": (producers or {}).get(n, "")} for n in names],
            "samples": {"rows": recording.rows, "calls": recording.meta["calls"]},
        }
        if shard is not None:
            meta["shard"] = shard
        write_json(folder / META, meta)  # written last: a cache without meta.json is not a cache
        return cls(folder, meta)

    def recording(self) -> Recording:
        return Recording.open(self.folder / RECORDING_DIR)

    def table(self) -> StatsTable:
        timesteps = np.array([np.nan if t is None else t for t in self.meta["timesteps"]], np.float64)
        tensors = {}
        try:
            with np.load(self.folder / STATS) as data:
                for i, entry in enumerate(self.meta["tensors"]):
                    st = TensorStats(entry["channel_axis"], data[f"t{i}.count"], data[f"t{i}.lo"], data[f"t{i}.hi"],
                                     data[f"t{i}.chan"], data[f"t{i}.hist"])
                    rows = {len(a) for a in (st.count, st.lo, st.hi, st.chan_absmax, st.hist)}
                    if rows != {len(timesteps)}:
                        raise UserError(f"--calib-cache {self.folder}: tensor '{entry['name']}' has {sorted(rows)} "
                                        f"rows of statistics for {len(timesteps)} timesteps; the cache is damaged")
                    tensors[entry["name"]] = st
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"--calib-cache {self.folder}: {STATS} is unreadable ({type(exc).__name__})") from None
        return StatsTable(timesteps, tensors)

    def summary(self) -> str:
        m = self.meta
        ts = [t for t in m["timesteps"] if t is not None]
        span = f"{len(ts)} timesteps {min(ts):g}..{max(ts):g}" if ts else "no timestep"
        return (f"{self.folder}: calibration cache, {len(m['tensors'])} tensors, {span}, "
                f"{m['samples']['rows']} rows from {m['samples']['calls']} calls; source {m['source']}\n"
                f"  graph {m['fingerprints']['graph'][:23]}…  cache {m['fingerprints']['cache'][:23]}…")
