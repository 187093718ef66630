"""The canonical float graph every target starts from."""

from __future__ import annotations

from qcompile.pass_manager import Pass
from qcompile.passes.cleanup import EliminateDeadNodes, NameNodes, RemoveIdentity
from qcompile.passes.fold_constants import FoldConstants
from qcompile.passes.infer_shapes import InferShapes


def canonicalize_passes() -> list[Pass]:
    """Run to a fixed point: folding exposes dead nodes, removal exposes new folds."""
    return [InferShapes(), FoldConstants(), RemoveIdentity(), EliminateDeadNodes(), NameNodes()]
