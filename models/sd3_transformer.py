"""SD3Transformer2DModel (SD 3.0 / 3.5): MMDiT over patchified latents, rectified-flow trained.

The SD3 pipeline feeds `timestep` = sigma * 1000 (float) and latents x_t = (1 - sigma) x0 + sigma noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from .base import Axis, InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule, spatial_axes, tokens_axis
from .common import DiffusersLoading, as_timesteps, hw, noise_flow, smooth_latent

CLIP_TOKENS, T5_TOKENS = 77, 256  # the pipeline concatenates CLIP-L/G (77) and T5 (256 by default)


class _Export(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class SD3TransformerAdapter(DiffusersLoading, ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.SD3_TRANSFORMER
    class_names: ClassVar[tuple[str, ...]] = ("SD3Transformer2DModel",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.FLOW
    output_names: ClassVar[tuple[str, ...]] = ("out_sample",)

    def __init__(self, module: torch.nn.Module, *, text_len: int = CLIP_TOKENS + T5_TOKENS):
        super().__init__(module)
        self.text_len = text_len

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """SD3.5-shaped (a dual-attention first block, RMS qk-norm): 2 blocks, 4 heads of 8, 16x16 latent."""
        return {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 32,
            "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 16,
            "dual_attention_layers": (0,), "qk_norm": "rms_norm",
        }

    def input_specs(self) -> tuple[InputSpec, ...]:
        cfg = self.module.config
        h, w = hw(cfg.sample_size)
        return (
            InputSpec("hidden_states", (1, cfg.in_channels, h, w), "float32", InputRole.SAMPLE),
            InputSpec("encoder_hidden_states", (1, self.text_len, cfg.joint_attention_dim), "float32",
                      InputRole.CONDITIONING),
            InputSpec("pooled_projections", (1, cfg.pooled_projection_dim), "float32", InputRole.CONDITIONING),
            InputSpec("timestep", (1,), "float32", InputRole.TIMESTEP),
        )

    def export_module(self) -> torch.nn.Module:
        return _Export(self.module)

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """Latent H/W: an even number of patches, up to pos_embed_max_size patches (the positional table
        is cropped, never extended); the joint prompt length: any.

        Even: the dynamo export of the table's centre crop, (max - n) // 2, is exact for even patch
        counts only (an odd count gets one row too many: measured, onnxscript 0.7 / torch 2.9)."""
        cfg = self.module.config
        limit = cfg.pos_embed_max_size * cfg.patch_size if cfg.pos_embed_max_size else None
        why = (f"an even number of {cfg.patch_size}-pixel patches (the exported crop of the positional table is "
               "exact for even counts)" + (f"; at most pos_embed_max_size {cfg.pos_embed_max_size} patches"
                                           if limit else ""))
        height, width = spatial_axes(*hw(cfg.sample_size), 2 * cfg.patch_size, why, limit)
        return {"hidden_states": {2: height, 3: width}, "encoder_hidden_states": {1: tokens_axis(self.text_len)}}

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^(pos_embed|time_text_embed|context_embedder|norm_out|proj_out)(\.|$)",)

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        t = as_timesteps(timesteps)
        rng = np.random.default_rng(seed)
        specs = self.input_specs()
        b = len(t)
        x0 = smooth_latent(rng, (b, *specs[0].shape[1:]))
        return {
            "hidden_states": noise_flow(x0, t / self.timestep_scale, rng),
            "encoder_hidden_states": rng.standard_normal((b, *specs[1].shape[1:])).astype(np.float32),
            "pooled_projections": rng.standard_normal((b, *specs[2].shape[1:])).astype(np.float32),
            "timestep": t,
        }
