"""Every pass in passes/ is run by some pipeline: canonicalization, a target's bucket passes, or the
build. A pass that nothing runs is dead code that still has to be read, tested and kept in step with
the graph contract, so it is deleted instead (docs/ARCHITECTURE.md, "How to add a pass")."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from qcompile.pass_manager import Pass

ROOT = Path(__file__).resolve().parents[1]
PASSES = ROOT / "passes"
# The files that assemble pipelines: the build and its helpers, every target, and canonicalization.
PIPELINE_FILES = [*sorted((ROOT / "qcompile").rglob("*.py")), *sorted((ROOT / "targets").rglob("*.py")),
                  PASSES / "canonicalize.py"]


def pass_classes() -> dict[str, str]:
    """{class name: module} for every Pass subclass defined in passes/."""
    found = {}
    for path in sorted(PASSES.glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"qcompile.passes.{path.stem}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Pass) and obj is not Pass and obj.__module__ == module.__name__:
                found[name] = path.stem
    return found


def test_there_are_passes_to_check():
    assert len(pass_classes()) >= 15


def test_every_pass_is_run_by_a_pipeline():
    sources = {path: path.read_text() for path in PIPELINE_FILES}
    unused = []
    for name, module in sorted(pass_classes().items()):
        word = re.compile(rf"\b{name}\(")
        users = [p for p, text in sources.items() if word.search(text) and p != PASSES / f"{module}.py"]
        if not users:
            unused.append(f"{name} (passes/{module}.py)")
    assert not unused, f"passes no pipeline constructs: {unused}"
