"""Atomic writes: a killed build never leaves a file, or an artifact folder, that looks complete.

Files are written under a temporary name in the same folder and renamed into place. Artifact folders
are built in a hidden staging folder beside `--out` and swapped in at the end, so a failed build
leaves the user's previous `--out` exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qcompile.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _replaceable(folder: Path) -> bool:
    """Missing, empty, or a folder qcompile wrote (its manifest.json parses as a qcompile manifest)."""
    from qcompile.manifest import is_artifact_folder

    return not folder.exists() or (folder.is_dir() and (not any(folder.iterdir()) or is_artifact_folder(folder)))


def _check_replaceable(folder: Path, option: str = "--out") -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: exists and is not a folder")
    if not _replaceable(folder):
        raise UserError(f"{option} {folder}: folder is not empty and is not a qcompile artifact; choose another")


SCRATCH = ".scratch"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove what killed builds into `out` left beside it: staging folders and half-swapped old folders
    whose process (its pid is in the name) no longer runs. SIGKILL cannot be caught, so the next build
    into the same place cleans up. Returns what was removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        name = p.name
        if not p.is_dir() or not name.startswith(f".{out.name}."):
            continue
        rest = name[len(out.name) + 2:]
        pid_text = rest.split(".")[0] if rest.endswith(".staging") else rest.removeprefix("old-")
        if not (rest.endswith(".staging") or rest.startswith("old-")) or not pid_text.isdigit():
            continue
        if int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class StagedFolder:
    """Build an output folder in a hidden sibling, then swap it in with `commit()`.

    An existing `out` is replaced only when it is empty or a previous qcompile artifact folder (its
    manifest.json is a qcompile manifest, not merely a file of that name); any other folder is refused,
    so the user's files are never clobbered. Without `commit()` (an error, Ctrl-C, SIGTERM) the staging
    folder is removed and `out` is untouched; after a SIGKILL the next build into the same place removes
    it (the staging folder's name carries the pid of the process that made it). Temporary data (the
    calibration recording, probes) lives in the staging folder's `.scratch`, removed before the swap.
    """

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        cwd = Path.cwd().resolve()
        if cwd == self.out or self.out in cwd.parents:  # the swap would pull the folder from under the shell
            raise UserError(f"--out {out}: is the current directory or holds it; give a folder outside it")
        _check_replaceable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for p in sweep_leftovers(self.out):
            print(f"[qcompile] removed {p}: left by a build that was killed", flush=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=".staging",
                                          dir=self.out.parent))
        os.chmod(self.path, 0o777 & ~_UMASK)
        self._committed = False

    def scratch(self) -> Path:
        """A folder for temporary data inside the staging folder (gone with it, never committed)."""
        path = self.path / SCRATCH
        path.mkdir(exist_ok=True)
        return path

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, dest: Path | None = None) -> Path:
        """Swap the staged folder in at `out` (or at `dest`, e.g. beside `out` for a build that missed a
        threshold); what was there is replaced only if it is replaceable (checked again: it may have
        changed during the build)."""
        dest = self.out if dest is None else Path(dest)
        _check_replaceable(dest)
        sweep_leftovers(dest)
        shutil.rmtree(self.path / SCRATCH, ignore_errors=True)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(self.path, dest)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest
