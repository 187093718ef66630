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

    def axes_record(self) -> dict[str, list[dict[str, Any]]]:
        """Per input name, what each axis of the exported graph accepts (JSON-able, for the manifest);
        empty where the adapter does not describe its axes."""
        return {}

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
    def dummy_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the right shapes and dtypes, keyed by ONNX input name."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for spec in self.input_specs():
            shape = (batch, *spec.shape[1:]) if spec.batched else spec.shape
            out[spec.name] = self._random_input(spec, shape, rng)
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
