"""The TensorRT targets' own options (no tensorrt import: the CLI reads this without the SDK)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.caps import QuantLevel
from qcompile.errors import UserError
from qcompile.target import OptionSpec, integer


class RescaleAt(enum.Enum):
    """Where the one-engine bucket graph multiplies the bucket's factor back (targets/tensorrt/buckets.py)."""

    INPUT = "input"  # DQ(q, s0) * r before every reader: bit-exact with the bucket's own graph
    OUTPUT = "output"  # behind each linear layer reading the DQ: the layer keeps its DQ -> layer pattern


# The demo's numbering of the same levels (TensorRT demo/Diffusion, ModelOpt's diffusers example).
LEVEL_NUMBERS = {"1.0": QuantLevel.CONV, "2.0": QuantLevel.FFN, "2.5": QuantLevel.QKV, "3.0": QuantLevel.LINEAR,
                 "4.0": QuantLevel.ATTENTION}


def level(text: str) -> QuantLevel:
    by_name = {lv.value: lv for lv in QuantLevel}
    found = by_name.get(text) or LEVEL_NUMBERS.get(text) or LEVEL_NUMBERS.get(f"{text}.0")
    if found is None:
        raise UserError(f"--trt-level {text}: choose one of {', '.join(by_name)} "
                        f"(or the demo's numbers {', '.join(LEVEL_NUMBERS)})")
    return found


TRT_LEVEL = OptionSpec("level", "--trt-level", level, "LEVEL",
                       "trt-*: layers quantized, cumulative: conv, ffn, qkv, linear, attention (the demo's 1.0, 2.0, "
                       "2.5, 3.0, 4.0); default linear for trt-int8, attention for trt-fp8")
TRT_MAX_BATCH = OptionSpec("max_batch", "--trt-max-batch", integer, "N",
                           "trt-*: largest batch of the engine's optimization profile (default 8)")
TRT_OPT_LEVEL = OptionSpec("opt_level", "--trt-opt-level", integer, "L",
                           "trt-*: TensorRT builder optimization level 0-5 (default 3)")


def rescale_at(text: str) -> RescaleAt:
    try:
        return RescaleAt(text)
    except ValueError:
        raise UserError(f"--trt-bucket-rescale {text}: choose input or output") from None


TRT_BUCKET_RESCALE = OptionSpec("bucket_rescale", "--trt-bucket-rescale", rescale_at, "WHERE",
                                "trt-* with --buckets K: where the one-engine graph undoes the bucket's rescale: input "
                                "(before each reader of a DQ: bit-exact, the default) or output (after each layer, so "
                                "layers read their DQ directly)")


def residuals(text: str) -> bool:
    if text not in ("quantized", "float"):
        raise UserError(f"--trt-residuals {text}: choose quantized or float")
    return text == "quantized"


TRT_RESIDUALS = OptionSpec("residual_adds", "--trt-residuals", residuals, "quantized|float",
                           "trt-*: the residual input of a skip Add fed by a quantized layer: quantized (default; "
                           "TensorRT fuses the Add into the layer) or float (transformers' residual stream keeps "
                           "full precision; the lint's residual-add rule is then off)")
TRT_TIMING_CACHE = OptionSpec("timing_cache", "--trt-timing-cache", Path, "FILE",
                              "trt-*: TensorRT timing cache, read when it exists and written back")


@dataclass(frozen=True, kw_only=True)
class TrtOptions:
    level: QuantLevel | None = None  # None: the target's default
    max_batch: int = 8
    opt_level: int = 3
    timing_cache: Path | None = None
    bucket_rescale: RescaleAt = RescaleAt.INPUT
    residual_adds: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"{TRT_MAX_BATCH.flag} {self.max_batch}: needs at least 1")
        if not 0 <= self.opt_level <= 5:
            raise UserError(f"{TRT_OPT_LEVEL.flag} {self.opt_level}: TensorRT's levels are 0 to 5")

    @classmethod
    def cli(cls) -> tuple[OptionSpec, ...]:
        return (TRT_LEVEL, TRT_MAX_BATCH, TRT_OPT_LEVEL, TRT_TIMING_CACHE, TRT_BUCKET_RESCALE, TRT_RESIDUALS)

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> TrtOptions:
        return cls(**values)
