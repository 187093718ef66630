"""Shared by the QNN tests: whether the HTP simulator is here, and quantizing a small float model."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompile.graph_io import load_graph, save_graph
from qcompile.pass_manager import PassContext, PassManager
from qcompile.passes.infer_shapes import InferShapes


def require_htp() -> None:
    from qcompile.targets.qnn import ep

    usable, why = ep.available()  # a missing extra is a UserError, reported as (False, why)
    if not usable:
        pytest.skip(f"QNN HTP simulator unavailable: {why}")


def quantize_float_model(path: Path, out: Path, ranges, caps, rewrites=()) -> Path:
    graph = load_graph(path)
    from qcompile.passes.insert_qdq_integer import InsertQDQEverywhere

    PassManager([InferShapes(), *rewrites, InferShapes(), InsertQDQEverywhere(ranges, caps), InferShapes()]).run(
        graph, PassContext())
    return save_graph(graph, out)
