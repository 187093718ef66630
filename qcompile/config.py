"""CompileConfig: every choice a build makes, frozen, typed, keyword-only.

Strings from the command line are parsed into enums here, once; inside the code only enums travel.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import UserError


class TargetName(enum.Enum):
    ORT_INT8 = "ort-int8"
    TFLITE_INT8 = "tflite-int8"
    TFLITE_FP32 = "tflite-fp32"
    QNN_W8A8 = "qnn-w8a8"
    QNN_W8A16 = "qnn-w8a16"
    TRT_INT8 = "trt-int8"
    TRT_FP8 = "trt-fp8"

    @classmethod
    def parse(cls, text: str) -> TargetName:
        return _parse_enum(cls, text, "--target")


class BucketMethod(enum.Enum):
    """How timesteps are grouped into buckets (qcompile.calibration.buckets)."""

    UNIFORM = "uniform"
    DATA = "data"

    @classmethod
    def parse(cls, text: str) -> BucketMethod:
        return _parse_enum(cls, text, "--bucket-method")


class Estimator(enum.Enum):
    """How a bucket's statistics become a clipping range."""

    MAX = "max"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"

    @classmethod
    def parse(cls, text: str) -> Estimator:
        return _parse_enum(cls, text, "--estimator")


class CalibKind(enum.Enum):
    SYNTHETIC = "synthetic"  # inputs built from the model's config: latents noised to spread timesteps
    FILE = "file"  # the user's .npz: arrays keyed by ONNX input name, samples on axis 0
    SAMPLE = "sample"  # record the model's own sampling loop (models that can sample)
    PROMPTS = "prompts"  # run the diffusers pipeline folder on a prompts file and record the component


@dataclass(frozen=True)
class CalibSpec:
    kind: CalibKind
    count: int = 0
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> CalibSpec:
        """`synthetic:N`, `sample:N` (N sampled trajectories), `prompts:FILE` (a pipeline run on each line
        of FILE) or a path to an .npz file."""
        if text.startswith(CalibKind.PROMPTS.value + ":"):
            path = Path(text[len(CalibKind.PROMPTS.value) + 1:])
            if not path.is_file():
                raise UserError(f"--calib {text}: no such prompts file")
            return cls(CalibKind.PROMPTS, path=path)
        for kind in (CalibKind.SYNTHETIC, CalibKind.SAMPLE):
            prefix = kind.value + ":"
            if text.startswith(prefix):
                try:
                    count = int(text[len(prefix):])
                except ValueError:
                    raise UserError(f"--calib {text}: the count after '{prefix}' must be an integer") from None
                if count <= 0:
                    raise UserError(f"--calib {text}: calibration needs at least one sample")
                return cls(kind, count=count)
        path = Path(text)
        if path.suffix != ".npz":
            raise UserError(f"--calib {text}: expected 'synthetic:N', 'sample:N', 'prompts:FILE' or a .npz file")
        if not path.is_file():
            raise UserError(f"--calib {text}: no such file")
        return cls(CalibKind.FILE, path=path)

    def describe(self) -> str:
        if self.kind is CalibKind.FILE:
            return str(self.path)
        if self.kind is CalibKind.PROMPTS:
            return f"prompts:{self.path}"
        return f"{self.kind.value}:{self.count}"


class SchedulerKind(enum.Enum):
    DDIM = "ddim"
    EULER = "euler"
    DPMPP_2M = "dpm++2m"

    @classmethod
    def parse(cls, text: str) -> SchedulerKind:
        return _parse_enum(cls, text, "--scheduler")


@dataclass(frozen=True)
class SamplerSettings:
    scheduler: SchedulerKind = SchedulerKind.DDIM
    steps: int = 20
    guidance: float = 2.5  # 1.0 disables classifier-free guidance; the reference model is judged at 2.5
    seed: int = 0


@dataclass(frozen=True)
class FidelitySettings:
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    per_class: int = 20
    # Images sampled on a device simulator (QNN HTP) besides the broad evaluation: each costs ~80
    # simulator calls (teacher-forced and free sampling, CFG pairs), about a second each for the reference.
    device_samples: int = 2


@dataclass(frozen=True)
class Thresholds:
    """A build fails (exit 1) when a summary metric misses its threshold; None disables one. The `min`
    metrics must reach their value, `cfg_gap_ratio_max` must stay at or below it."""

    eps_sqnr_db_mean: float | None = 10.0
    eps_cos_mean: float | None = None
    sample_psnr_db: float | None = 25.0  # only checked for models that sample (builtin:reference: ~40 dB)
    # The prompt-steering gate, for models sampled with guidance: the largest per-step ratio of the
    # quantization error of (cond - uncond) to its float magnitude. Above 1 at a step, the error there is
    # larger than the guidance signal. Off by default: the reference model's ort-int8 artifact reaches
    # 1.41 at t = 949 while keeping its class accuracy (1.0) and 41.8 dB sample PSNR, because the
    # guidance signal itself is small at the first steps (see docs/usage.md).
    cfg_gap_ratio_max: float | None = None

    UPPER_BOUNDS = ("cfg_gap_ratio_max",)

    def check(self, summary: Mapping[str, Any]) -> dict[str, bool]:
        """Which thresholds the summary meets (metrics a build did not measure are left out)."""
        out = {}
        for key, limit in asdict(self).items():
            if limit is None or summary.get(key) is None:
                continue
            value = summary[key]
            out[key] = bool(value <= limit) if key in self.UPPER_BOUNDS else bool(value >= limit)
        return out


# Per-bucket mixed precision measures this many candidate layers one by one in each bucket.
DEFAULT_BUCKET_CANDIDATES = 32


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    model: str  # folder, pipeline folder (with component) or builtin:<name>
    component: str | None = None
    target: TargetName = TargetName.ORT_INT8
    out_dir: Path
    calib: CalibSpec | None = None  # None: the model's default (sample:32 if it can sample, else synthetic:16)
    calib_cache: Path | None = None  # reuse the statistics there (same graph only), or write them there
    export_from: Path | None = None  # reuse the canonical float model of an export or artifact folder
    estimator: Estimator = Estimator.MAX
    buckets: int = 1
    bucket_method: BucketMethod = BucketMethod.DATA
    # Module-path regexes kept in float, on top of (or instead of) the family's defaults.
    exclude: tuple[str, ...] = ()
    full_integer: bool = False  # quantize every layer; ignore the family's default float layers
    # Mixed precision: keep the most sensitive layers float until the output SQNR (dB, on recorded
    # inputs) reaches this, using at most `max_float_layers`; or, without a target, exactly that many.
    mixed_precision_sqnr_db: float | None = None
    split_shortcut: bool = False  # Q-Diffusion shortcut split of Conv(Concat(deep, skip)) before calibration
    # SmoothQuant alpha for the quantized MatMul/Gemm layers (None: off); statistics are collected again.
    smoothquant_alpha: float | None = None
    max_float_layers: int | None = None
    # Mixed precision's per-layer sensitivity probes as tasks on the Ray cluster at this address ('':
    # a local Ray instance for the build); None: one after the other on this machine.
    ray: str | None = None
    # Mixed precision per timestep bucket (qcompile.bucket_precision): each bucket raises its own fewest
    # layers until its rows reach `mixed_precision_sqnr_db` and/or a CFG-gap ratio at most
    # `mixed_precision_cfg_gap`, at most `max_float_layers` each, measuring only the
    # `mixed_precision_candidates` layers whose activations quantize worst in the bucket.
    mixed_precision_per_bucket: bool = False
    mixed_precision_cfg_gap: float | None = None
    mixed_precision_candidates: int | None = None  # None: DEFAULT_BUCKET_CANDIDATES
    # Bias correction (qcompile.bias_correction): per bucket, each quantized layer's mean output error per
    # channel on calibration rows, measured on the target's runtime, subtracted from its bias.
    bias_correction: bool = False
    validate_count: int = 8  # held-back inputs for the report
    # Static-shape targets (tflite-*, qnn-*): the full shape each named input is built for (`--shape`);
    # inputs not named take the calibration data's shapes.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # The target's own options (a frozen dataclass the target declares, e.g. QnnOptions); None: its defaults.
    target_options: Any = None
    seed: int = 0
    opset: int = 20
    thresholds: Thresholds = field(default_factory=Thresholds)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)  # models that can sample

    @property
    def bucket_candidates(self) -> int:
        """Layers measured one by one per bucket by per-bucket mixed precision."""
        return DEFAULT_BUCKET_CANDIDATES if self.mixed_precision_candidates is None else self.mixed_precision_candidates

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise UserError(f"--buckets {self.buckets}: needs at least one bucket")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise UserError(f"--smoothquant {self.smoothquant_alpha}: alpha must be within [0, 1]")
        if self.validate_count < 1:
            raise UserError(f"--validate {self.validate_count}: needs at least one input")
        gap = self.mixed_precision_cfg_gap
        if gap is not None and not gap > 0:
            raise UserError(f"--mixed-precision-cfg-gap {gap}: needs a positive number")
        if self.mixed_precision_candidates is not None:
            if self.mixed_precision_candidates < 1:
                raise UserError(f"--mixed-precision-candidates {self.mixed_precision_candidates}: needs at least 1")
            if not self.mixed_precision_per_bucket:
                raise UserError("--mixed-precision-candidates: a per-bucket setting; add --mixed-precision-per-bucket")
        if self.mixed_precision_per_bucket:
            if self.mixed_precision_sqnr_db is None and gap is None and self.max_float_layers is None:
                raise UserError("--mixed-precision-per-bucket: needs a target (--mixed-precision SQNR_DB, "
                                "--mixed-precision-cfg-gap R) or a budget (--max-float-layers N)")
            if self.smoothquant_alpha is not None:
                raise UserError("--mixed-precision-per-bucket and --smoothquant: not together (SmoothQuant "
                                "rewrites the graph the buckets' sensitivities would be measured on)")
        elif gap is not None:
            raise UserError("--mixed-precision-cfg-gap: a per-bucket target; add --mixed-precision-per-bucket")
        if self.ray is not None and self.mixed_precision_sqnr_db is None and self.max_float_layers is None \
                and not self.mixed_precision_per_bucket:
            raise UserError("--ray: a build runs only mixed precision's sensitivity probes on Ray; it needs "
                            "--mixed-precision, --max-float-layers or --mixed-precision-per-bucket (Ray calibration: "
                            "qcompile calibrate --ray)")
        if self.opset < 18:
            raise UserError(f"--opset {self.opset}: qcompile needs opset 18 or newer")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`--shape NAME=D0xD1x...` (D0 is the batch for batched inputs) as (NAME, dims)."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise UserError(f"--shape {text}: expected NAME=D0xD1x... with positive integers, e.g. sample=1x4x64x64")
    return name, shape


def _parse_enum(cls: type[enum.Enum], text: str, option: str):
    for member in cls:
        if member.value == text:
            return member
    valid = ", ".join(m.value for m in cls)
    raise UserError(f"{option} {text}: unknown; choose one of {valid}")
