"""The model adapter contract: what qcompile needs to know about one diffusers model family.

An adapter wraps a loaded diffusers module and says what its inputs are (named as the diffusers
forward arguments, so users' calibration files carry over), which input is the timestep and which
are conditioning, how to make dummy and synthetic calibration inputs, how to wrap the module for
torch.onnx export, and which layers stay float by default.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch


class ModelFamily(enum.Enum):
    UNET2D = "unet2d"  # UNet2DModel (unconditional / class-embedding DDPM)
    UNET2D_CONDITION = "unet2d-condition"  # UNet2DConditionModel: SD 1.x/2.x, SDXL (added_cond_kwargs)
    TRANSFORMER2D = "transformer2d"  # DiT / PixArt Transformer2DModel family
    SD3_TRANSFORMER = "sd3-transformer"  # SD3Transformer2DModel
    FLUX_TRANSFORMER = "flux-transformer"  # FluxTransformer2DModel
    VAE_DECODER = "vae-decoder"  # AutoencoderKL.decode (post_quant_conv + decoder)
    VAE_ENCODER = "vae-encoder"  # AutoencoderKL.encode (encoder + quant_conv)
    CLIP_TEXT = "clip-text"  # transformers CLIPTextModel / CLIPTextModelWithProjection


class InputRole(enum.Enum):
    SAMPLE = "sample"  # the noisy latent the sampler updates (denoisers), or the VAE's input
    TIMESTEP = "timestep"  # the diffusion timestep (or sigma-scaled time for flow models)
    CONDITIONING = "conditioning"  # text/class embeddings, pooled projections, time ids, guidance
    INDEX = "index"  # integer inputs (token ids, positional ids): never quantized


class NoiseSchedule(enum.Enum):
    """How a clean latent becomes the model's input at timestep t (for synthetic calibration)."""

    DDPM = "ddpm"  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, 1000)
    FLOW = "flow"  # x_t = (1 - s) x0 + s eps, s in [0, 1]; timestep = s * timestep_scale
    NONE = "none"  # not a denoiser: VAE, text encoder


@dataclass(frozen=True)
class Axis:
    """What one axis of an exported input accepts.

    Axes with the same `name` across inputs are one dimension (the batch of every batched input, the
    prompt length of a text embedding and its mask): the exporter makes them one symbol, and a value
    must be the same on each. A fixed axis says `why` it cannot change, so the manifest can tell users.
    """

    name: str  # "batch", "height", "width", "tokens", or the input's own name for a fixed axis
    default: int  # the value the adapter's example inputs use
    dynamic: bool = False
    multiple: int = 1  # valid values are multiples of this (latent H/W: 2^levels or the patch size)
    min: int = 1
    max: int | None = None  # positional-embedding limits (SD3 pos_embed_max_size x patch, CLIP's 77)
    why: str = ""  # for a fixed axis: why it is fixed; for a dynamic one: what sets its limits

    def accepts(self, value: int) -> bool:
        if not self.dynamic:
            return value == self.default
        return value >= self.min and value % self.multiple == 0 and (self.max is None or value <= self.max)

    def describe(self) -> str:
        """'64', or 'height: a multiple of 8 in [8, 128]' (for one-line errors)."""
        if not self.dynamic:
            return str(self.default)
        parts = [f"a multiple of {self.multiple}"] if self.multiple > 1 else []
        parts.append(f">= {self.min}" if self.max is None else f"in [{self.min}, {self.max}]")
        return f"{self.name}: {' '.join(parts)}"

    def alternative(self) -> int:
        """A valid value other than the default (the export check runs the graph there too)."""
        up = self.default + self.multiple
        return up if self.max is None or up <= self.max else self.default - self.multiple

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dynamic": self.dynamic, "default": self.default}
        if self.dynamic:
            out.update(multiple=self.multiple, min=self.min, max=self.max)
        if self.why:
            out["why"] = self.why
        return out


BATCH_MAX = 4096


def batch_axis() -> Axis:
    return Axis("batch", 1, dynamic=True, max=BATCH_MAX, why="classifier-free guidance doubles it")


def spatial_axes(h: int, w: int, multiple: int, why: str, max_size: int | None = None) -> tuple[Axis, Axis]:
    """Latent height and width: multiples of `multiple` (what the down/upsampling or patching needs)."""
    return tuple(Axis(name, size, dynamic=True, multiple=multiple, min=multiple, max=max_size, why=why)
                 for name, size in (("height", h), ("width", w)))


def tokens_axis(default: int, max_tokens: int | None = None) -> Axis:
    """A prompt length (text embeddings feed cross- or joint attention: any length works)."""
    return Axis("tokens", default, dynamic=True, max=max_tokens, why="attention over the prompt's tokens")


@dataclass(frozen=True)
class InputSpec:
    """One ONNX input. `shape` is the shape of a batch-1 example; axis 0 is the (dynamic) batch."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32" or "int64"
    role: InputRole
    # False for inputs with no batch axis (Flux `img_ids`/`txt_ids` are (tokens, 3) in diffusers
    # 0.42): `shape` is then the full shape and stays fixed when the batch changes.
    batched: bool = True


class ModelAdapter(abc.ABC):
    """Wraps one loaded diffusers (or transformers) module of a known family."""

    family: ClassVar[ModelFamily]
    # `_class_name` values of a diffusers config.json (or `architectures` of a transformers one)
    # that this adapter loads.
    class_names: ClassVar[tuple[str, ...]]
    noise_schedule: ClassVar[NoiseSchedule]
    output_names: ClassVar[tuple[str, ...]]

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, folder: Path) -> ModelAdapter:
        """Load from a `save_pretrained` folder (config.json + weights)."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0) -> ModelAdapter:
        """Build from a config with seeded random weights (tests, benchmarks)."""

    @classmethod
    @abc.abstractmethod
    def tiny_config(cls) -> dict[str, Any]:
        """A small config of the real architecture that exports and runs in seconds on a CPU."""

    # --- signature ----------------------------------------------------------------------------
    @abc.abstractmethod
    def input_specs(self) -> tuple[InputSpec, ...]:
        """The ONNX inputs, in the order `export_module().forward` takes them."""

    @abc.abstractmethod
    def export_module(self) -> torch.nn.Module:
        """A module whose forward takes the inputs positionally and returns the output tensor(s)."""

    def input_axes(self) -> dict[str, tuple[Axis, ...]]:
        """Per input name, what each axis of the exported graph accepts. By default only the batch of a
        batched input is dynamic; adapters name the other axes their architecture lets vary
        (`dynamic_axes`)."""
        dynamic = self.dynamic_axes()
        out: dict[str, tuple[Axis, ...]] = {}
        for spec in self.input_specs():
            given = dynamic.get(spec.name, {})
            axes = []
            for dim, size in enumerate(spec.shape):
                if dim in given:
                    axes.append(given[dim])
                elif dim == 0 and spec.batched:
                    axes.append(batch_axis())
                else:
                    axes.append(Axis(f"{spec.name}.{dim}", size, why=self.fixed_reason(spec.name, dim)))
            out[spec.name] = tuple(axes)
        return out

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """Per input name, the non-batch axes that may vary: {dim: Axis}. None by default."""
        return {}

    def fixed_reason(self, name: str, dim: int) -> str:
        """Why axis `dim` of input `name` is fixed (the manifest says so)."""
        return "a weight dimension (channels or features)"

    def axes_record(self) -> dict[str, list[dict[str, Any]]]:
        """`input_axes`, JSON-able, for the manifest."""
        return {name: [a.as_dict() for a in axes] for name, axes in self.input_axes().items()}

    def example_shape(self, spec: InputSpec, batch: int, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape of `spec` at `batch` with the named dynamic axes at `sizes` (defaults elsewhere)."""
        axes = self.input_axes()[spec.name]
        sizes = {**(sizes or {}), "batch": batch}
        return tuple(sizes.get(a.name, a.default) if a.dynamic else a.default for a in axes)

    def default_float_scopes(self) -> tuple[str, ...]:
        """Regexes over module paths (node metadata `qcompile.module`) kept in float by default."""
        return ()

    def sampling(self) -> Any | None:
        """A SamplingSetup (qcompile.evaluation.fidelity) when the model can be sampled end to end
        (conditioning, scheduler, a judge of its outputs); None for a bare component."""
        return None

    @property
    def timestep_scale(self) -> float:
        """Timesteps the model is fed span [0, timestep_scale) (1000 for DDPM/SD3; 1 for Flux)."""
        return 1000.0

    # --- example inputs -----------------------------------------------------------------------
    def dummy_inputs(self, batch: int = 1, seed: int = 0, sizes: dict[str, int] | None = None
                     ) -> dict[str, np.ndarray]:
        """Random inputs of the right shapes and dtypes, keyed by ONNX input name; `sizes` sets named
        dynamic axes ("height", "tokens", ...) to other values than their defaults."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for spec in self.input_specs():
            out[spec.name] = self._random_input(spec, self.example_shape(spec, batch, sizes), rng)
        return out

    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.role is InputRole.TIMESTEP:
            return rng.uniform(0, self.timestep_scale, size=shape).astype(spec.dtype)
        if spec.role is InputRole.INDEX:
            return rng.integers(0, 16, size=shape).astype(spec.dtype)
        return rng.standard_normal(shape).astype(spec.dtype)

    @abc.abstractmethod
    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        """Calibration inputs, one sample per timestep (batch = len(timesteps)).

        For denoisers: a smooth random clean latent noised to each timestep by `noise_schedule`,
        conditioning of the right shapes. For non-denoisers the timesteps only set the count.
        """
