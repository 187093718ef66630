"""The shapes a static-shape artifact (tflite-*, qnn-*) is built for.

The exported graph keeps the axes its adapter names dynamic (batch, latent height/width, prompt
length). A runtime with static tensors needs them fixed when the file is built: the build pins every
dynamic axis but the batch here (the target's `--static-batch` fixes that in its StaticShapes pass),
from `--shape NAME=D0xD1x...` where given, else from the calibration data's shapes, else from the
adapter's defaults. The artifact is validated at those shapes, and the manifest records them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompile.calibration.inputs import InputSet, expected_shape
from qcompile.errors import UserError


@dataclass(frozen=True)
class PinnedShapes:
    # Per input, its shape with None where the batch goes (the target's static batch).
    shapes: Mapping[str, tuple[int | None, ...]]
    asked: Mapping[str, tuple[int, ...]]  # what --shape asked for, batch included


def _fmt(dims: Sequence[int | None]) -> str:
    return "x".join("N" if d is None else str(d) for d in dims)


def pin_shapes(asked: Sequence[tuple[str, tuple[int, ...]]], adapter, target_name: str, batch: int | None,
               data: InputSet | None, held_out: InputSet) -> PinnedShapes | None:
    """The pinned shapes for a static-shape target built for `batch` (None: a dynamic target, which
    refuses --shape). `data`: the calibration rows when they are the user's; `held_out`: the validation
    inputs, which must be at the pinned shapes (a static artifact is checked at the shape it accepts)."""
    if batch is None:
        if asked:
            raise UserError(f"--shape: target {target_name} keeps dynamic shapes (the manifest records each input's "
                            "axes); --shape is for the static-shape targets tflite-*, qnn-*")
        return None
    axes = adapter.input_axes()
    given: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, tuple[int, str]] = {}  # axis name -> (value, where it came from)
    for name, dims in asked:
        flag = f"--shape {name}={_fmt(dims)}"
        if name not in axes:
            raise UserError(f"{flag}: the model has no input '{name}'; its inputs are {', '.join(axes)}")
        if name in given:
            raise UserError(f"{flag}: input '{name}' is given twice")
        ax = axes[name]
        if len(dims) != len(ax) or not all(a.name == "batch" or a.accepts(d) for d, a in zip(dims, ax, strict=True)):
            raise UserError(f"{flag}: expected {expected_shape(ax)}")
        if ax[0].name == "batch" and dims[0] != batch:
            raise UserError(f"{flag}: {target_name} builds for batch {batch} (--static-batch); give "
                            f"{name}={_fmt((batch, *dims[1:]))} or change --static-batch")
        given[name] = dims
        for d, a in zip(dims, ax, strict=True):
            if a.dynamic and a.name != "batch":
                if a.name in sizes and sizes[a.name][0] != d:
                    raise UserError(f"{flag}: its {a.name} is {d}, but {sizes[a.name][1]} gives {sizes[a.name][0]}")
                sizes.setdefault(a.name, (d, flag))
    for source in (data, held_out):
        for name, arr in (source.arrays.items() if source is not None else ()):
            for d, a in zip(arr.shape, axes[name], strict=True):
                if a.dynamic and a.name != "batch":
                    sizes.setdefault(a.name, (int(d), "the calibration data"))
    shapes = {name: tuple(None if a.name == "batch" else sizes[a.name][0] if a.name in sizes else a.default
                          for a in ax) for name, ax in axes.items()}
    for name, arr in held_out.arrays.items():
        want = shapes[name]
        if any(w is not None and w != g for g, w in zip(arr.shape, want, strict=True)):
            raise UserError(f"{target_name} is built for '{name}' {_fmt(want)}, but the validation inputs have "
                            f"{_fmt(arr.shape)}: a static-shape artifact is checked at the shapes it accepts; give "
                            "--calib an .npz at those shapes (its last quarter validates)")
    return PinnedShapes(shapes, given)


def pin_graph(graph: gs.Graph, pinned: PinnedShapes | None) -> gs.Graph:
    """`graph` (a copy the caller owns) with its inputs' dynamic axes but the batch set to the pinned
    values; shape inference in the target's StaticShapes pass carries them through."""
    if pinned is None:
        return graph
    for t in graph.inputs:
        want = pinned.shapes.get(t.name)
        if want is not None and t.shape is not None:
            t.shape = [d if w is None else w for d, w in zip(t.shape, want, strict=True)]
    return graph


def accepted_shapes(pinned: PinnedShapes | None, batch: int | None) -> dict[str, tuple[int, ...]]:
    """What a static artifact accepts, batch included (the manifest's `input_shapes`)."""
    if pinned is None or batch is None:
        return {}
    return {name: tuple(batch if d is None else d for d in dims) for name, dims in pinned.shapes.items()}
