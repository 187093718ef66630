"""AutoencoderKL, as two adapters: the decoder (latent -> image) and the encoder (image -> latent mean).

Decoder: ONNX input `z` is what `vae.decode` receives, i.e. the sampler's latent already divided by
`scaling_factor` (and shifted by `shift_factor` for SD3/Flux VAEs); output `sample` is the image in
about [-1, 1]. The export covers post_quant_conv + decoder.
Encoder: input `sample` (image in [-1, 1]); output `latent_mean`, the mean of the latent Gaussian
(encoder + quant_conv, first half of the moments), which pipelines use for img2img with argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from .base import Axis, InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule, spatial_axes
from .common import DiffusersLoading, as_timesteps, hw, smooth_latent


class _Decode(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z, return_dict=False)[0]


class _EncodeMean(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.model.encode(sample, return_dict=False)[0].mean


class _AutoencoderKLAdapter(DiffusersLoading, ModelAdapter):
    class_names: ClassVar[tuple[str, ...]] = ("AutoencoderKL",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.NONE

    def __init__(self, module: torch.nn.Module):
        super().__init__(module)
        # tiling/slicing would put Python-side control flow into the export
        module.use_tiling = False
        module.use_slicing = False

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        from diffusers import AutoencoderKL

        return AutoencoderKL

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """SD-VAE-shaped: two levels (16, 32) so a 32x32 image maps to a 4x16x16 latent."""
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
            "block_out_channels": (16, 32), "norm_num_groups": 8, "sample_size": 32,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        }

    @property
    def image_hw(self) -> tuple[int, int]:
        return hw(self.module.config.sample_size)

    @property
    def latent_hw(self) -> tuple[int, int]:
        factor = 2 ** (len(self.module.config.block_out_channels) - 1)
        h, w = self.image_hw
        return h // factor, w // factor


class VaeDecoderAdapter(_AutoencoderKLAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.VAE_DECODER
    output_names: ClassVar[tuple[str, ...]] = ("sample",)

    def input_specs(self) -> tuple[InputSpec, ...]:
        return (InputSpec("z", (1, self.module.config.latent_channels, *self.latent_hw), "float32",
                          InputRole.SAMPLE),)

    def export_module(self) -> torch.nn.Module:
        return _Decode(self.module)

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """Any latent size: the decoder only upsamples."""
        height, width = spatial_axes(*self.latent_hw, 1, "the decoder only upsamples: any latent size")
        return {"z": {2: height, 3: width}}

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^post_quant_conv$", r"^decoder\.(conv_in|conv_out|conv_norm_out)$")

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        """Smooth unit-variance latents mapped as pipelines do: z = latent / scaling + shift."""
        n = len(as_timesteps(timesteps))
        cfg = self.module.config
        latent = smooth_latent(np.random.default_rng(seed), (n, *self.input_specs()[0].shape[1:]), std=1.0)
        return {"z": (latent / cfg.scaling_factor + (cfg.shift_factor or 0.0)).astype(np.float32)}


class VaeEncoderAdapter(_AutoencoderKLAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.VAE_ENCODER
    output_names: ClassVar[tuple[str, ...]] = ("latent_mean",)

    def input_specs(self) -> tuple[InputSpec, ...]:
        return (InputSpec("sample", (1, self.module.config.in_channels, *self.image_hw), "float32",
                          InputRole.SAMPLE),)

    def export_module(self) -> torch.nn.Module:
        return _EncodeMean(self.module)

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """Image H/W: multiples of 2^(levels - 1), the latent's pixel size."""
        factor = 2 ** (len(self.module.config.block_out_channels) - 1)
        height, width = spatial_axes(*self.image_hw, factor, f"{factor} = 2^(levels - 1) pixels per latent pixel")
        return {"sample": {2: height, 3: width}}

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^quant_conv$", r"^encoder\.(conv_in|conv_out|conv_norm_out)$")

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        """Smooth random images in [-1, 1] (the range pipelines' image processors produce)."""
        n = len(as_timesteps(timesteps))
        image = smooth_latent(np.random.default_rng(seed), (n, *self.input_specs()[0].shape[1:]), std=0.5)
        return {"sample": np.clip(image, -1.0, 1.0)}
