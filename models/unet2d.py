"""UNet2DModel: unconditional (or class-conditional) DDPM UNets, usually in pixel space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from qcompile.errors import UserError

from .base import Axis, InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule, spatial_axes
from .common import LINEAR, DiffusersLoading, as_timesteps, hw, noise_ddpm, smooth_latent


class _Export(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(sample, timestep, class_labels=class_labels, return_dict=False)[0]


class UNet2DAdapter(DiffusersLoading, ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.UNET2D
    class_names: ClassVar[tuple[str, ...]] = ("UNet2DModel",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.DDPM
    output_names: ClassVar[tuple[str, ...]] = ("out_sample",)

    def __init__(self, module: torch.nn.Module, *, schedule: tuple[str, float, float] = LINEAR):
        super().__init__(module)
        self.schedule = schedule
        cfg = module.config
        if cfg.class_embed_type is not None:
            raise UserError(f"UNet2DModel class_embed_type={cfg.class_embed_type!r} is not supported "
                            "(only num_class_embeds class labels)")
        self.with_labels = cfg.num_class_embeds is not None

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        from diffusers import UNet2DModel

        return UNet2DModel

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """A DDPM-style pixel UNet: 3 channels, 16x16, two levels with attention on the second."""
        return {
            "_class_name": "UNet2DModel",
            "sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
            "block_out_channels": (32, 64), "norm_num_groups": 8, "attention_head_dim": 8,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        }

    def input_specs(self) -> tuple[InputSpec, ...]:
        cfg = self.module.config
        h, w = hw(cfg.sample_size)
        specs = [InputSpec("sample", (1, cfg.in_channels, h, w), "float32", InputRole.SAMPLE),
                 InputSpec("timestep", (1,), "float32", InputRole.TIMESTEP)]
        if self.with_labels:
            specs.append(InputSpec("class_labels", (1,), "int64", InputRole.INDEX))
        return tuple(specs)

    def export_module(self) -> torch.nn.Module:
        return _Export(self.module)

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """H/W: multiples of 2^(levels - 1), so every skip connection meets its upsampled twin."""
        h, w = hw(self.module.config.sample_size)
        factor = 2 ** (len(self.module.config.block_out_channels) - 1)
        height, width = spatial_axes(h, w, factor, f"{factor} = 2^(levels - 1): each level halves the image")
        return {"sample": {2: height, 3: width}}

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^(time_proj|time_embedding|class_embedding)(\.|$)",
                r"^conv_in$", r"^conv_out$", r"^conv_norm_out$")

    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.name == "class_labels":
            return rng.integers(0, self.module.config.num_class_embeds, size=shape).astype(np.int64)
        return super()._random_input(spec, shape, rng)

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        """By default the linear 1e-4..0.02 betas of the DDPM UNets (google/ddpm-*)."""
        t = as_timesteps(timesteps)
        rng = np.random.default_rng(seed)
        specs = self.input_specs()
        x0 = np.clip(smooth_latent(rng, (len(t), *specs[0].shape[1:]), std=0.5), -1.0, 1.0)  # image-like
        out = {"sample": noise_ddpm(x0, t, rng, self.schedule), "timestep": t}
        if self.with_labels:
            out["class_labels"] = self._random_input(specs[2], (len(t),), rng)
        return out
