"""Random small ONNX graphs for the property tests (tests/test_fuzz_*.py), drawn by hypothesis.

A graph is a chain of blocks over one running tensor, starting from one graph input (or two combined):
an image [N, C, H, W] or a token sequence [N, L, D]. Each block is drawn for the shape it will read,
so every spec hypothesis draws, and every spec it shrinks to, is a valid opset-20 model that
onnxruntime runs. A spec is a frozen dataclass with a readable repr: a failing example printed by
hypothesis can be pasted into a regular test as it is (`build_model(spec)` is deterministic; weights
and inputs come from `spec.seed`).

`OpSet` says which blocks a property may draw: the passes see every form the exporters write
(decomposed LayerNorm / GELU / RMSNorm, Einsum, NaN guards, foldable weight chains); an emitter sees
what its target lowers (TFLite: no grouped, non-depthwise Conv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
MAX_ELEMENTS = 3072  # per sample: keeps every graph a few milliseconds in onnxruntime


# --- blocks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    out: int
    kernel: int
    stride: int
    pads: tuple[int, int, int, int]
    group: int
    dilation: int = 1
    bias: bool = True
    folded_weight: bool = False  # weight written as Transpose(constant), as exporters leave some


@dataclass(frozen=True)
class Binary:
    """Add/Mul with a broadcasting constant of `operand` shape, or with the running tensor itself."""

    op: str  # Add | Mul
    operand: str  # scalar | one | channel | last | full | self
    magnitude: float = 1.0


@dataclass(frozen=True)
class Act:
    kind: str  # Relu | Sigmoid | SiLU | Gelu | Tanh | GeluErf (decomposed) | Identity


@dataclass(frozen=True)
class GroupNorm:
    """As exporters write it: Reshape -> InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta)."""

    groups: int
    affine: bool = True
    shape_from_input: bool = False  # Reshape back to Shape(x), as the legacy exporter writes it


@dataclass(frozen=True)
class InstanceNorm:
    pass


@dataclass(frozen=True)
class LayerNorm:
    decomposed: bool = False
    beta: bool = True


@dataclass(frozen=True)
class RMSNorm:
    """Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) [-> Mul(weight)] (or Div(x, Sqrt))."""

    divide: bool = False
    weight: bool = True


@dataclass(frozen=True)
class Softmax:
    axis: int
    nan_guard: bool = False  # Where(IsNaN(p), 0, p), as SDPA exports write it


@dataclass(frozen=True)
class Concat:
    axis: int
    other: str  # self | relu | conv (1x1 / linear branch of `width` channels)
    width: int = 1
    conv_after: int = 0  # > 0: a 3x3 Conv to this many channels reads the Concat (a UNet up block's skip)


@dataclass(frozen=True)
class Transpose:
    perm: tuple[int, ...]
    einsum: bool = False  # the same permutation as a one-input Einsum


@dataclass(frozen=True)
class Slice:
    axis: int
    start: int
    end: int
    step: int


@dataclass(frozen=True)
class Resize:
    """Nearest, scale 2 on H and W."""


@dataclass(frozen=True)
class ToTokens:
    """[N, C, H, W] -> Reshape [N, C, H*W] -> Transpose [N, H*W, C]."""

    shape_from_input: bool = False  # Reshape target from Shape(x)[:2] + [-1]


@dataclass(frozen=True)
class ToImage:
    """[N, h*w, D] -> Transpose [N, D, h*w] -> Reshape [N, D, h, w]."""


@dataclass(frozen=True)
class Unpatchify:
    """DiT's final projection and unpatchify: Linear to p*p*c features, then [N, h*w, p*p*c] -> Reshape 6-D
    -> Transpose (0,5,1,3,2,4) -> Reshape [N, c, h*p, w*p]."""

    patch: int
    channels: int


@dataclass(frozen=True)
class Linear:
    """MatMul with a constant [D, out] weight (+ Add bias), as exporters write nn.Linear."""

    out: int
    bias: bool = True
    folded_weight: bool = False


@dataclass(frozen=True)
class GemmRows:
    """Reshape [N*L, D] -> Gemm -> Reshape [N, L, out]."""

    out: int
    trans_b: bool
    bias: bool = True


@dataclass(frozen=True)
class Attention:
    """Self-attention of the running tensor with itself: Softmax(x x^T * scale) x."""

    scale: float
    nan_guard: bool = False


@dataclass(frozen=True)
class Residual:
    """x + Conv1x1(x) (image) or x + Linear(x) (tokens)."""


Block = (Conv | Binary | Act | GroupNorm | InstanceNorm | LayerNorm | RMSNorm | Softmax | Concat | Transpose | Slice
         | Resize | ToTokens | ToImage | Unpatchify | Linear | GemmRows | Attention | Residual)


@dataclass(frozen=True)
class GraphSpec:
    shape: tuple[int, ...]  # the graph input, [N, C, H, W] or [N, L, D]
    grid: tuple[int, int] | None  # (h, w) with h * w = L for a token input
    blocks: tuple[Block, ...]
    seed: int = 0
    combine: str = ""  # '' | Add | Mul | Concat: a second input `z` of the same shape, combined first
    input_scale: float = 1.0
    input_offset: float = 0.0

    def inputs(self, count: int, seed: int) -> list[dict[str, np.ndarray]]:
        """`count` feeds of one sample batch each, values ~ offset + scale * N(0, 1)."""
        rng = np.random.default_rng([self.seed, seed])
        names = ["x", "z"] if self.combine else ["x"]
        return [{n: (self.input_offset + self.input_scale * rng.standard_normal(self.shape)).astype(np.float32)
                 for n in names} for _ in range(count)]


@dataclass(frozen=True)
class OpSet:
    """Which blocks a property may draw."""

    grouped_conv: bool = True
    decomposed: bool = True  # LayerNorm / GELU (erf) spelled out, for the fusion passes
    nan_guard: bool = True
    einsum: bool = True
    folded: bool = True  # foldable weight chains, Identity, Shape-computed Reshape targets
    unit_norms: bool = True  # LayerNorm / RMSNorm over a last axis of size 1
    excluded: frozenset[str] = field(default_factory=frozenset)  # block class names (or Act kinds) never drawn

    def allows(self, block: type) -> bool:
        return block.__name__ not in self.excluded


EVERYTHING = OpSet()


# --- drawing --------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _draw_conv(draw, shape, ops: OpSet) -> tuple[Block, tuple[int, ...]] | None:
    n, c, h, w = shape
    kernel = draw(st.sampled_from([1, 2, 3]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    stride = draw(st.sampled_from([1, 1, 2]))
    pads = tuple(draw(st.integers(0, kernel - 1)) for _ in range(4)) if kernel > 1 else (0, 0, 0, 0)
    span = dilation * (kernel - 1) + 1
    oh, ow = (h + pads[0] + pads[2] - span) // stride + 1, (w + pads[1] + pads[3] - span) // stride + 1
    if oh < 1 or ow < 1:
        return None
    form = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    if form == "depthwise":
        group, out = c, c * draw(st.sampled_from([1, 1, 2]))
    elif form == "grouped" and ops.grouped_conv and len(_divisors(c)) > 2:
        group = draw(st.sampled_from(_divisors(c)[1:-1]))
        out = group * draw(st.integers(1, max(1, 16 // group)))
    else:
        group, out = 1, draw(st.integers(1, 16))
    if n * out * oh * ow > MAX_ELEMENTS:
        return None
    folded = ops.folded and group == 1 and draw(st.booleans())
    return Conv(out, kernel, stride, pads, group, dilation, draw(st.booleans()), folded), (n, out, oh, ow)


def _draw_block(draw, shape, grid, ops: OpSet):
    """One block readable from `shape`; returns (block, new shape, new grid) or None (draw another)."""
    rank = len(shape)
    choices = ["Binary", "Act", "Softmax", "Concat", "Transpose", "Slice", "LayerNorm", "Residual"]
    if rank == 4:
        choices += ["Conv", "Conv", "GroupNorm", "InstanceNorm", "Resize", "ToTokens"]
    else:
        choices += ["Linear", "Linear", "GemmRows", "Attention", "RMSNorm"]
        if grid is not None:
            choices += ["ToImage", "Unpatchify"]
    kind = draw(st.sampled_from([c for c in choices if c not in ops.excluded]))
    n = shape[0]
    if kind == "Conv":
        found = _draw_conv(draw, shape, ops)
        return None if found is None else (*found, None)
    if kind == "Binary":
        operand = draw(st.sampled_from(["scalar", "one", "channel", "last", "full", "self"]))
        magnitude = draw(st.sampled_from([0.1, 1.0, 4.0]))
        return Binary(draw(st.sampled_from(["Add", "Mul"])), operand, magnitude), shape, grid
    if kind == "Act":
        kinds = ["Relu", "Sigmoid", "SiLU", "Gelu", "Tanh"] + (["GeluErf"] if ops.decomposed else []) + \
            (["Identity"] if ops.folded else [])
        return Act(draw(st.sampled_from([k for k in kinds if k not in ops.excluded]))), shape, grid
    if kind == "Softmax":
        return Softmax(draw(st.sampled_from([1, -1])), ops.nan_guard and draw(st.booleans())), shape, grid
    if kind == "Concat":
        axis = draw(st.integers(1, rank - 1))
        other = draw(st.sampled_from(["self", "relu", "conv"]))
        width = draw(st.integers(1, 8)) if other == "conv" else shape[axis]
        axis_for_width = 1 if rank == 4 else rank - 1  # a conv/linear branch changes channels / features
        if other == "conv":
            axis = axis_for_width
        new = list(shape)
        new[axis] += width
        if _size(new) > MAX_ELEMENTS:
            return None
        if rank == 4 and axis == 1 and draw(st.booleans()):
            out = draw(st.integers(1, 12))
            if n * out * shape[2] * shape[3] > MAX_ELEMENTS:
                return None
            return Concat(axis, other, width, out), (n, out, *shape[2:]), None
        return Concat(axis, other, width), tuple(new), grid if axis == rank - 1 else None
    if kind == "Transpose":
        perm = (0, *draw(st.permutations(list(range(1, rank)))))
        if perm == tuple(range(rank)):
            return None
        einsum = ops.einsum and draw(st.booleans())
        return Transpose(perm, einsum), tuple(shape[p] for p in perm), None
    if kind == "Slice":
        axis = draw(st.integers(1, rank - 1))
        dim = shape[axis]
        if dim < 2:
            return None
        start = draw(st.integers(0, dim - 1))
        end = draw(st.integers(start + 1, dim))
        step = draw(st.sampled_from([1, 1, 2]))
        new = list(shape)
        new[axis] = len(range(start, end, step))
        return Slice(axis, start, end, step), tuple(new), grid if axis == rank - 1 else None
    if kind in ("LayerNorm", "RMSNorm") and shape[-1] == 1 and not ops.unit_norms:
        return None
    if kind == "LayerNorm":
        decomposed = ops.decomposed and draw(st.booleans())
        return LayerNorm(decomposed, draw(st.booleans())), shape, grid
    if kind == "Residual":
        return Residual(), shape, grid
    if kind == "GroupNorm":
        groups = draw(st.sampled_from(_divisors(shape[1])))
        return GroupNorm(groups, draw(st.booleans()), ops.folded and draw(st.booleans())), shape, grid
    if kind == "InstanceNorm":
        return InstanceNorm(), shape, grid
    if kind == "Resize":
        new = (n, shape[1], shape[2] * 2, shape[3] * 2)
        return (Resize(), new, None) if _size(new) <= MAX_ELEMENTS else None
    if kind == "ToTokens":
        _, c, h, w = shape
        return ToTokens(ops.folded and draw(st.booleans())), (n, h * w, c), (h, w)
    if kind == "ToImage":
        h, w = grid
        return ToImage(), (n, shape[2], h, w), None
    if kind == "Unpatchify":
        p, c = draw(st.sampled_from([2, 3])), draw(st.integers(1, 4))
        h, w = grid
        new = (n, c, h * p, w * p)
        return (Unpatchify(p, c), new, None) if _size(new) <= MAX_ELEMENTS else None
    if kind == "Linear":
        out = draw(st.integers(1, 24))
        new = (*shape[:-1], out)
        if _size(new) > MAX_ELEMENTS:
            return None
        return Linear(out, draw(st.booleans()), ops.folded and draw(st.booleans())), new, grid
    if kind == "GemmRows":
        out = draw(st.integers(1, 24))
        new = (*shape[:-1], out)
        if _size(new) > MAX_ELEMENTS:
            return None
        return GemmRows(out, draw(st.booleans()), draw(st.booleans())), new, grid
    if kind == "Attention":
        if n * shape[1] * shape[1] > MAX_ELEMENTS:
            return None
        scale = draw(st.sampled_from([0.1, 1.0 / math.sqrt(shape[2]), 1.0]))
        return Attention(scale, ops.nan_guard and draw(st.booleans())), shape, grid
    if kind == "RMSNorm":
        return RMSNorm(draw(st.booleans()), draw(st.booleans())), shape, grid
    raise AssertionError(kind)


@st.composite
def graph_specs(draw, ops: OpSet = EVERYTHING, max_blocks: int = 6, weighted: bool = False) -> GraphSpec:
    """`weighted`: the graph has at least one Conv / MatMul / Gemm with a constant weight (a Residual,
    x + Conv1x1(x) or x + Linear(x), is appended when the drawn blocks have none)."""
    n = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        shape = (n, draw(st.integers(1, 12)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
        grid = None
    else:
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        shape, grid = (n, h * w, draw(st.integers(1, 24))), (h, w)
    combine = draw(st.sampled_from(["", "", "Add", "Mul", "Concat"]))
    if combine == "Concat":
        shape_after = (n, 2 * shape[1], *shape[2:])
        grid_after = None
    else:
        shape_after, grid_after = shape, grid
    blocks = []
    current, current_grid = shape_after, grid_after
    for _ in range(draw(st.integers(1, max_blocks))):
        found = _draw_block(draw, current, current_grid, ops)
        if found is None:
            continue
        block, current, current_grid = found
        blocks.append(block)
    if weighted and not has_weighted_op(GraphSpec(shape, grid, tuple(blocks))):
        blocks.append(Residual())
    return GraphSpec(shape, grid, tuple(blocks), draw(st.integers(0, 2**16)), combine,
                     draw(st.sampled_from([0.1, 1.0, 1.0, 5.0])), draw(st.sampled_from([0.0, 0.0, 0.5, -1.0])))


def moves_data_only(spec: GraphSpec) -> bool:
    """Whether no block computes anything (Transpose / Slice / Resize / layout changes only)."""
    return spec.combine in ("", "Concat") and all(
        isinstance(b, Transpose | Slice | Resize | ToTokens | ToImage) or isinstance(b, Concat) and b.other == "self"
        for b in spec.blocks)


def has_weighted_op(spec: GraphSpec) -> bool:
    """Whether the graph has a Conv / MatMul / Gemm with a constant weight (what the ORT/TFLite
    planner quantizes around; without one a TFLite graph stays float)."""
    return any(isinstance(b, Conv | Linear | GemmRows | Residual | Unpatchify)
               or isinstance(b, Concat) and (b.other == "conv" or b.conv_after) for b in spec.blocks)


# --- building -------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, values) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], base: str | None = None, outputs: int = 1, **attrs) -> str:
        name = self.name(base or op.lower())
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name, **attrs))
        return outs[0]

    def normal(self, shape, scale: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def weight(self, base: str, shape: tuple[int, ...], fan_in: int, folded: bool, perm=None) -> str:
        """A He-like weight; `folded`: stored transposed behind a Transpose node (perm swaps it back)."""
        w = self.normal(shape, float(self.rng.uniform(0.5, 2.0)) / math.sqrt(max(fan_in, 1)))
        if not folded:
            return self.const(base, w)
        perm = perm or tuple(reversed(range(len(shape))))
        stored = self.const(base + "_t", np.ascontiguousarray(np.transpose(w, np.argsort(perm))))
        return self.node("Transpose", [stored], base, perm=list(perm))


def _apply(b: _Builder, block: Block, x: str, shape: tuple[int, ...]) -> str:
    rank = len(shape)
    if isinstance(block, Conv):
        c = shape[1]
        w_shape = (block.out, c // block.group, block.kernel, block.kernel)
        fan_in = w_shape[1] * block.kernel * block.kernel
        w = b.weight("conv_w", w_shape, fan_in, block.folded_weight, perm=(1, 0, 2, 3))
        inputs = [x, w] + ([b.const("conv_b", b.normal((block.out,), 0.3))] if block.bias else [])
        return b.node("Conv", inputs, "conv", kernel_shape=[block.kernel] * 2, strides=[block.stride] * 2,
                      pads=list(block.pads), group=block.group, dilations=[block.dilation] * 2)
    if isinstance(block, Binary):
        if block.operand == "self":
            return b.node(block.op, [x, x], block.op.lower())
        const_shape = {"scalar": (), "one": (1,), "full": shape[1:],
                       "channel": (shape[1],) + (1,) * (rank - 2) if rank == 4 else (shape[-1],),
                       "last": (1,) * (rank - 2) + (shape[-1],)}[block.operand]
        values = b.normal(const_shape, block.magnitude)
        if block.op == "Mul":
            values = values + np.float32(np.sign(values.mean() or 1.0) * block.magnitude)  # not all near 0
        return b.node(block.op, [x, b.const(block.op.lower() + "_c", values)], block.op.lower())
    if isinstance(block, Act):
        if block.kind == "SiLU":
            return b.node("Mul", [x, b.node("Sigmoid", [x])], "silu")
        if block.kind == "GeluErf":
            inner = b.node("Div", [x, b.const("sqrt2", np.float32(math.sqrt(2.0)))])
            one_plus = b.node("Add", [b.node("Erf", [inner]), b.const("one", np.float32(1.0))])
            return b.node("Mul", [b.node("Mul", [x, b.const("half", np.float32(0.5))]), one_plus], "gelu")
        return b.node(block.kind, [x])
    if isinstance(block, GroupNorm):
        n, c = shape[:2]
        grouped = b.node("Reshape", [x, b.const("group_shape", np.array([0, block.groups, -1], np.int64))])
        normed = b.node("InstanceNormalization", [grouped, b.const("ones", np.ones(block.groups, np.float32)),
                                                  b.const("zeros", np.zeros(block.groups, np.float32))],
                        epsilon=1e-5)
        target = b.node("Shape", [x]) if block.shape_from_input else \
            b.const("shape", np.array([0, *shape[1:]], np.int64))  # 0: the batch, copied (it is symbolic)
        y = b.node("Reshape", [normed, target], "groupnorm_restored")
        if block.affine:
            gamma = (1.0 + b.normal((c, 1, 1), 0.3)).astype(np.float32)
            y = b.node("Mul", [y, b.const("gn_gamma", gamma)], "groupnorm_gamma")
            y = b.node("Add", [y, b.const("gn_beta", b.normal((c, 1, 1), 0.2))], "groupnorm_beta")
        return y
    if isinstance(block, InstanceNorm):
        c = shape[1]
        return b.node("InstanceNormalization", [x, b.const("in_scale", (1.0 + b.normal((c,), 0.3)).astype(np.float32)),
                                                b.const("in_bias", b.normal((c,), 0.2))], epsilon=1e-5)
    if isinstance(block, LayerNorm):
        d = shape[-1]
        gamma = (1.0 + b.normal((d,), 0.3)).astype(np.float32)
        beta = b.normal((d,), 0.2)
        if not block.decomposed:
            inputs = [x, b.const("ln_gamma", gamma)] + ([b.const("ln_beta", beta)] if block.beta else [])
            return b.node("LayerNormalization", inputs, axis=-1, epsilon=1e-5)
        axes = b.const("axes", np.array([-1], np.int64))
        d_t = b.node("Sub", [x, b.node("ReduceMean", [x, axes], keepdims=1)])
        var = b.node("ReduceMean", [b.node("Pow", [d_t, b.const("two", np.float32(2.0))]), axes], keepdims=1)
        root = b.node("Sqrt", [b.node("Add", [var, b.const("eps", np.float32(1e-5))])])
        y = b.node("Mul", [b.node("Div", [d_t, root]), b.const("ln_gamma", gamma)])
        return b.node("Add", [y, b.const("ln_beta", beta)], "layernorm") if block.beta else y
    if isinstance(block, RMSNorm):
        axes = b.const("axes", np.array([-1], np.int64))
        ms = b.node("ReduceMean", [b.node("Pow", [x, b.const("two", np.float32(2.0))]), axes], keepdims=1)
        root = b.node("Sqrt", [b.node("Add", [ms, b.const("eps", np.float32(1e-6))])])
        y = b.node("Div", [x, root]) if block.divide else b.node("Mul", [x, b.node("Reciprocal", [root])])
        if block.weight:
            y = b.node("Mul", [y, b.const("rms_w", (1.0 + b.normal((shape[-1],), 0.3)).astype(np.float32))], "rmsnorm")
        return y
    if isinstance(block, Softmax):
        p = b.node("Softmax", [x], axis=block.axis)
        return _nan_guard(b, p) if block.nan_guard else p
    if isinstance(block, Concat):
        if block.other == "self":
            other = x
        elif block.other == "relu":
            other = b.node("Relu", [x])
        elif rank == 4:
            other = _apply(b, Conv(block.width, 1, 1, (0, 0, 0, 0), 1), x, shape)
        else:
            other = _apply(b, Linear(block.width), x, shape)
        cat = b.node("Concat", [x, other], axis=block.axis)
        if not block.conv_after:
            return cat
        cat_shape = (shape[0], shape[1] + block.width, *shape[2:])
        return _apply(b, Conv(block.conv_after, 3, 1, (1, 1, 1, 1), 1), cat, cat_shape)
    if isinstance(block, Transpose):
        if block.einsum:
            letters = "nabcd"[:rank]
            return b.node("Einsum", [x], equation=f"{letters}->{''.join(letters[p] for p in block.perm)}")
        return b.node("Transpose", [x], perm=list(block.perm))
    if isinstance(block, Slice):
        return b.node("Slice", [x, b.const("starts", np.array([block.start], np.int64)),
                                b.const("ends", np.array([block.end], np.int64)),
                                b.const("axes", np.array([block.axis], np.int64)),
                                b.const("steps", np.array([block.step], np.int64))])
    if isinstance(block, Resize):
        return b.node("Resize", [x, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if isinstance(block, ToTokens):
        n, c, h, w = shape
        if block.shape_from_input:
            head = b.node("Shape", [x], start=0, end=2)
            target = b.node("Concat", [head, b.const("minus_one", np.array([-1], np.int64))], axis=0)
        else:
            target = b.const("flat_shape", np.array([0, c, h * w], np.int64))
        return b.node("Transpose", [b.node("Reshape", [x, target])], "to_tokens", perm=[0, 2, 1])
    if isinstance(block, ToImage):
        raise AssertionError("ToImage needs the grid: handled by build_model")
    if isinstance(block, Linear):
        d = shape[-1]
        w = b.weight("linear_w", (d, block.out), d, block.folded_weight)
        y = b.node("MatMul", [x, w], "linear")
        return b.node("Add", [y, b.const("linear_b", b.normal((block.out,), 0.3))], "linear_bias") if block.bias else y
    if isinstance(block, GemmRows):
        d = shape[-1]
        rows = b.node("Reshape", [x, b.const("rows", np.array([-1, d], np.int64))])
        w_shape = (block.out, d) if block.trans_b else (d, block.out)
        inputs = [rows, b.weight("gemm_w", w_shape, d, False)]
        if block.bias:
            inputs.append(b.const("gemm_b", b.normal((block.out,), 0.3)))
        y = b.node("Gemm", inputs, transB=int(block.trans_b))
        return b.node("Reshape", [y, b.const("unrows", np.array([-1, *shape[1:-1], block.out], np.int64))])
    if isinstance(block, Attention):
        scores = b.node("MatMul", [x, b.node("Transpose", [x], "keys", perm=[0, 2, 1])], "qk")
        scaled = b.node("Mul", [scores, b.const("attn_scale", np.float32(block.scale))])
        p = b.node("Softmax", [scaled], axis=-1)
        if block.nan_guard:
            p = _nan_guard(b, p)
        return b.node("MatMul", [p, x], "av")
    if isinstance(block, Residual):
        branch = _apply(b, Conv(shape[1], 1, 1, (0, 0, 0, 0), 1), x, shape) if rank == 4 else \
            _apply(b, Linear(shape[-1]), x, shape)
        return b.node("Add", [x, branch], "residual")
    raise AssertionError(block)


def _nan_guard(b: _Builder, p: str) -> str:
    return b.node("Where", [b.node("IsNaN", [p]), b.const("zero", np.float32(0.0)), p], "nan_guard")


def build_model(spec: GraphSpec) -> onnx.ModelProto:
    """The spec as an opset-20 model: inputs `x` (and `z`) with a symbolic batch, one output `y`;
    checked by onnx. Reshape targets copy the batch (0) or infer it (-1), as exports with a dynamic
    batch write them."""
    b = _Builder(spec.seed)
    x = "x"
    dims = ["N", *spec.shape[1:]]  # a symbolic batch, as exporters leave it
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    shape, grid = spec.shape, spec.grid
    if spec.combine:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, dims))
        if spec.combine == "Concat":
            x = b.node("Concat", ["x", "z"], axis=1)
            shape, grid = (shape[0], 2 * shape[1], *shape[2:]), None
        else:
            x = b.node(spec.combine, ["x", "z"])
    for block in spec.blocks:
        if isinstance(block, ToImage):
            d = shape[2]
            t = b.node("Transpose", [x], perm=[0, 2, 1])
            x = b.node("Reshape", [t, b.const("image_shape", np.array([0, d, *grid], np.int64))], "to_image")
        elif isinstance(block, Unpatchify):
            p, (h, w), c = block.patch, grid, block.channels
            x = _apply(b, Linear(p * p * c), x, shape)
            six = b.node("Reshape", [x, b.const("patch_shape", np.array([0, h, w, p, p, c], np.int64))])
            t = b.node("Transpose", [six], perm=[0, 5, 1, 3, 2, 4])
            x = b.node("Reshape", [t, b.const("image_shape", np.array([0, c, h * p, w * p], np.int64))], "unpatchify")
        else:
            x = _apply(b, block, x, shape)
        shape, grid = _next_shape(block, shape, grid)
    if x in ("x", "z"):
        b.nodes.append(helper.make_node("Identity", [x], ["y"], "output"))
    else:  # the last op writes the graph output itself, as in an exported model
        producer = next(node for node in b.nodes if x in node.output)
        producer.output[list(producer.output).index(x)] = "y"
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape[1:]])
    graph = helper.make_graph(b.nodes, "fuzz", inputs, [output], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _next_shape(block: Block, shape: tuple[int, ...], grid):
    """The shape after `block` (the same arithmetic the strategy used when drawing it)."""
    rank, n = len(shape), shape[0]
    if isinstance(block, Conv):
        _, _, h, w = shape
        span = block.dilation * (block.kernel - 1) + 1
        return (n, block.out, (h + block.pads[0] + block.pads[2] - span) // block.stride + 1,
                (w + block.pads[1] + block.pads[3] - span) // block.stride + 1), None
    if isinstance(block, Concat):
        if block.conv_after:
            return (n, block.conv_after, *shape[2:]), None
        new = list(shape)
        new[block.axis] += block.width
        return tuple(new), grid if block.axis == rank - 1 else None
    if isinstance(block, Transpose):
        return tuple(shape[p] for p in block.perm), None
    if isinstance(block, Slice):
        new = list(shape)
        new[block.axis] = len(range(block.start, block.end, block.step))
        return tuple(new), grid if block.axis == rank - 1 else None
    if isinstance(block, Resize):
        return (n, shape[1], shape[2] * 2, shape[3] * 2), None
    if isinstance(block, ToTokens):
        return (n, shape[2] * shape[3], shape[1]), (shape[2], shape[3])
    if isinstance(block, ToImage):
        return (n, shape[2], *grid), None
    if isinstance(block, Unpatchify):
        p, (h, w) = block.patch, grid
        return (n, block.channels, h * p, w * p), None
    if isinstance(block, Linear | GemmRows):
        return (*shape[:-1], block.out), grid
    return shape, grid


# --- fixed examples: every block and every rewrite in each profile, whatever hypothesis draws ---------
IMAGE_EXAMPLE = GraphSpec(
    (2, 4, 6, 6), None,
    (Conv(8, 3, 1, (1, 1, 1, 1), 1, folded_weight=True), GroupNorm(2), Act("SiLU"), Act("Identity"),
     Concat(1, "conv", 4, conv_after=8), Transpose((0, 1, 3, 2), einsum=True), Conv(8, 3, 2, (1, 1, 1, 1), 8),
     InstanceNorm(), Resize(), Slice(3, 1, 6, 2), Softmax(1), ToTokens(shape_from_input=True),
     LayerNorm(), Act("Gelu"), ToImage(), Binary("Mul", "channel"), Act("Tanh")),
    seed=7, combine="Add")
TOKEN_EXAMPLE = GraphSpec(
    (2, 16, 12), (4, 4),
    (Linear(16, folded_weight=True), RMSNorm(), Attention(0.25, nan_guard=True), Residual(), GemmRows(12, True),
     LayerNorm(decomposed=True), Binary("Add", "last"), Act("Sigmoid"), Unpatchify(2, 3)),
    seed=11, input_offset=0.5)
