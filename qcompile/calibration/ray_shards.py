"""Calibration shards as Ray tasks: `qcompile calibrate --ray [ADDRESS] --shards N`.

Each task runs one shard of the calibration (`shards.py`) in a temporary folder on its node, loading
the model once, and returns the shard cache's files: statistics, plus the recording from shard 1 only,
never activations. The driver writes them beside the cache and merges them (`merge_shards`), so the
cache is the one a single machine writes for the same rows, byte for byte where the nodes compute
alike. A task that fails is retried (qcompile.ray_tasks.RETRIES more times, also when its worker or
node dies); a shard that keeps failing fails the calibration in one line naming it. Ray is an
optional extra (`pip install 'qcompile[ray]'`); without an address a local Ray instance is started
and stopped.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.shards import merge_shards
from qcompile.errors import UserError
from qcompile.ray_tasks import RETRIES, ray_session, require_ray, task_result


def _run_shard(index: int, count: int, model: str, settings: dict[str, Any]) -> dict[str, bytes]:
    """One shard, on whichever node Ray chose: the shard cache's files by relative path."""
    from qcompile import api

    with tempfile.TemporaryDirectory(prefix="qcompile-shard-") as tmp:
        folder = Path(tmp) / "shard"
        api.calibrate(model, folder, shard=f"{index}/{count}", **settings)
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def calibrate_on_ray(model: str, cache: Path, *, address: str, shards: int, settings: dict[str, Any],
                     num_cpus: int | None = None) -> CalibrationCache:
    """`shards` shard tasks on the Ray cluster at `address` ('' for a new local instance, of `num_cpus`
    CPUs), merged into the new cache folder `cache`. `settings`: `api.calibrate`'s keyword arguments,
    the same for every shard (paths in them must exist on every node)."""
    require_ray()
    if shards < 1:
        raise UserError(f"--shards {shards}: at least 1")
    if CalibrationCache.exists(cache):
        raise UserError(f"--calib-cache {cache}: already holds a calibration cache; choose a new folder")
    with ray_session(address, num_cpus) as ray:
        work = Path(tempfile.mkdtemp(prefix=f".{Path(cache).name}.", suffix=".shards", dir=Path(cache).parent))
        try:
            task = ray.remote(max_retries=RETRIES, retry_exceptions=True)(_run_shard)
            pending = {task.remote(i, shards, model, settings): i for i in range(1, shards + 1)}
            folders = []
            with tqdm(total=shards, desc="shards on Ray", unit="shard") as progress:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    index = pending.pop(ref)
                    files = task_result(ray, ref, f"shard {index}/{shards}")
                    folders.append(_write(work / f"shard-{index}", files))
                    progress.update(1)
            return merge_shards(Path(cache), folders)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder
