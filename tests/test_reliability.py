"""What a build script relies on: nothing the user had is lost, a killed build leaves nothing behind the
next build does not clean, the same command gives the same bytes, and exit codes mean one thing each."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcompile.cli import main

TINY = "builtin:tiny-unet2d"
FAST = ["--calib", "synthetic:6", "--validate", "3"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcompile.cli", *args]


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file except the report (which holds timings)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("report.")}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_same_command_twice_gives_the_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["build", TINY, "--out", str(a), *FAST]) == 0
    assert main(["build", TINY, "--out", str(b), *FAST]) == 0
    ha, hb = _hashes(a), _hashes(b)
    assert ha.keys() == hb.keys() and "manifest.json" in ha and "model.onnx.data" in ha
    assert ha == hb, {k for k in ha if ha[k] != hb.get(k)}


def test_a_foreign_manifest_json_is_not_an_artifact(tmp_path, capsys):
    """A web app's folder with its own manifest.json is refused, not replaced."""
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my app", "icons": []}))
    (app / "index.html").write_text("<html></html>")
    assert main(["build", TINY, "--out", str(app), *FAST]) == 2
    assert "is not a qcompile artifact" in capsys.readouterr().err
    assert sorted(p.name for p in app.iterdir()) == ["index.html", "manifest.json"]


def test_a_threshold_miss_keeps_the_previous_artifact(tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["build", TINY, "--out", str(out), *FAST]) == 0
    before = _hashes(out)
    assert main(["build", TINY, "--out", str(out), *FAST, "--min-sqnr-db", "150"]) == 1
    assert _hashes(out) == before  # the good artifact is untouched
    failed = tmp_path / "artifact.failed"
    report = json.loads((failed / "report.json").read_text())
    assert not report["passed"] and report["checks"]["eps_sqnr_db_mean"] is False
    assert f"{out} is unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_build_leaves_nothing_a_rebuild_does_not_remove(tmp_path, sig):
    out = tmp_path / "artifact"
    proc = subprocess.Popen(_cli("build", TINY, "--out", str(out), *FAST), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:  # kill it mid-build: after the export, while it calibrates
        if "calibrating" in line or time.time() > deadline:
            break
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    staged = _leftovers(tmp_path, "artifact")
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and staged == []  # cleaned up on the way out
        assert "terminated; nothing was written to --out" in proc.stderr.read()
    else:
        assert len(staged) == 1 and staged[0].endswith(".staging")  # SIGKILL cannot be caught
        assert (tmp_path / staged[0] / ".scratch").is_dir()  # temporary data lives inside it
    assert not out.exists()
    assert main(["build", TINY, "--out", str(out), *FAST]) == 0
    assert _leftovers(tmp_path, "artifact") == [] and (out / "manifest.json").is_file()


def test_an_internal_error_is_one_line_with_its_own_exit_code(tmp_path, capsys, monkeypatch):
    import qcompile.stages

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(qcompile.stages, "calibrate_stage", broken)
    assert main(["build", TINY, "--out", str(tmp_path / "x"), *FAST]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qcompile: internal error: ZeroDivisionError: division by zero (a bug in qcompile; -v shows the "
                   "traceback)"]
    assert not (tmp_path / "x").exists() and _leftovers(tmp_path, "x") == []


def test_out_that_holds_the_current_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """`--out .` inside an artifact would swap the folder out from under the user's shell: refused in
    one line before the build starts, the artifact untouched."""
    art = tmp_path / "art"
    assert main(["build", TINY, "--out", str(art), *FAST]) == 0
    before = _hashes(art)
    monkeypatch.chdir(art)
    capsys.readouterr()
    assert main(["build", TINY, "--out", ".", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out .: is the current directory" in err[0]
    assert _hashes(art) == before and _leftovers(tmp_path, "art") == []
