"""passes/, targets/, models/ install as qcompile.passes, qcompile.targets, qcompile.models, in
editable and wheel installs alike, with the reference model's weights as package data."""

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"qcompile": "qcompile", "qcompile.passes": "passes", "qcompile.targets": "targets",
           "qcompile.models": "models"}


def _declared() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_declared():
    found = set()
    for dotted, folder in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([dotted, *rel.parts]) if rel.parts else dotted)
    assert found == set(_declared())


def test_wheel_holds_the_mapped_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("qcompile-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("qcompile/cli.py", "qcompile/passes/insert_qdq.py", "qcompile/targets/ort_int8/target.py",
                   "qcompile/models/source.py"):
        assert module in names
    assert not any(n.startswith(("passes/", "targets/", "models/", "tests/", "tools/")) for n in names)
    reference = [n for n in names if n.startswith("qcompile/models/reference/")]
    on_disk = [p for p in (ROOT / "models" / "reference").rglob("*") if p.is_file()] \
        if (ROOT / "models" / "reference").exists() else []
    assert len(reference) == len(on_disk)
