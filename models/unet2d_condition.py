"""UNet2DConditionModel: SD 1.x / 2.x (text cross-attention) and SDXL (plus `added_cond_kwargs`).

SDXL's `added_cond_kwargs={"text_embeds", "time_ids"}` is a dict, which ONNX cannot take; the export
wrapper takes the two tensors as separate inputs under their dict keys, so a recorder that flattens
the pipeline's call one level finds every name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from qcompile.errors import UserError

from .base import Axis, InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule, spatial_axes, tokens_axis
from .common import SCALED_LINEAR, DiffusersLoading, as_timesteps, hw, noise_ddpm, smooth_latent

VAE_SCALE = 8  # pixels per latent pixel in every SD-family pipeline (for SDXL time_ids)


class _Export(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kw = dict(zip(self.names, inputs, strict=True))
        added = {k: kw.pop(k) for k in ("text_embeds", "time_ids") if k in kw}
        return self.model(**kw, added_cond_kwargs=added or None, return_dict=False)[0]


class UNet2DConditionAdapter(DiffusersLoading, ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.UNET2D_CONDITION
    class_names: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.DDPM
    output_names: ClassVar[tuple[str, ...]] = ("out_sample",)

    def __init__(self, module: torch.nn.Module, *, text_len: int = 77,
                 schedule: tuple[str, float, float] = SCALED_LINEAR):
        """`text_len`: tokens of `encoder_hidden_states`; `schedule`: the betas synthetic inputs use."""
        super().__init__(module)
        cfg = module.config
        self.text_len = text_len
        self.schedule = schedule
        if cfg.addition_embed_type not in (None, "text_time"):
            raise UserError(f"UNet2DConditionModel addition_embed_type={cfg.addition_embed_type!r} is not "
                            "supported (only SD-style None and SDXL 'text_time')")
        if cfg.class_embed_type is not None:
            raise UserError(f"UNet2DConditionModel class_embed_type={cfg.class_embed_type!r} is not supported")
        self.sdxl = cfg.addition_embed_type == "text_time"

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """SD 1.x-shaped: two levels (32, 64), cross-attention on the first, 16x16 latent."""
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": (32, 64), "norm_num_groups": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32, "attention_head_dim": 8,
        }

    @classmethod
    def tiny_sdxl_config(cls) -> dict[str, Any]:
        """SDXL-shaped: linear projections, per-level head dims, `text_time` added conditioning."""
        text_embeds_dim, time_dim = 32, 8
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": (32, 64), "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2), "attention_head_dim": (2, 4),
            "use_linear_projection": True, "cross_attention_dim": 32,
            "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": text_embeds_dim + 6 * time_dim,
        }

    # --- signature ----------------------------------------------------------------------------
    def _context_dim(self) -> int:
        cfg = self.module.config
        dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    def input_specs(self) -> tuple[InputSpec, ...]:
        cfg = self.module.config
        h, w = hw(cfg.sample_size)
        specs = [
            InputSpec("sample", (1, cfg.in_channels, h, w), "float32", InputRole.SAMPLE),
            InputSpec("timestep", (1,), "float32", InputRole.TIMESTEP),
            InputSpec("encoder_hidden_states", (1, self.text_len, self._context_dim()), "float32",
                      InputRole.CONDITIONING),
        ]
        if cfg.num_class_embeds is not None:
            specs.append(InputSpec("class_labels", (1,), "int64", InputRole.INDEX))
        if self.sdxl:
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            specs.append(InputSpec("text_embeds", (1, text_dim), "float32", InputRole.CONDITIONING))
            specs.append(InputSpec("time_ids", (1, 6), "float32", InputRole.CONDITIONING))
        return tuple(specs)

    def export_module(self) -> torch.nn.Module:
        return _Export(self.module, tuple(s.name for s in self.input_specs()))

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """Latent H/W: multiples of 2^(levels - 1), so every skip connection meets its upsampled twin
        without diffusers' interpolation fallback; the prompt length: any (cross-attention keys)."""
        h, w = hw(self.module.config.sample_size)
        factor = 2 ** (len(self.module.config.block_out_channels) - 1)
        height, width = spatial_axes(h, w, factor, f"{factor} = 2^(levels - 1): each level halves the latent")
        return {"sample": {2: height, 3: width}, "encoder_hidden_states": {1: tokens_axis(self.text_len)}}

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^(time_proj|time_embedding|add_time_proj|add_embedding|class_embedding)(\.|$)",
                r"^conv_in$", r"^conv_out$", r"^conv_norm_out$")

    # --- example inputs -----------------------------------------------------------------------
    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.name == "class_labels":
            return rng.integers(0, self.module.config.num_class_embeds, size=shape).astype(np.int64)
        return super()._random_input(spec, shape, rng)

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        t = as_timesteps(timesteps)
        rng = np.random.default_rng(seed)
        specs = {s.name: s for s in self.input_specs()}
        b = len(t)
        x0 = smooth_latent(rng, (b, *specs["sample"].shape[1:]))
        out = {"sample": noise_ddpm(x0, t, rng, self.schedule), "timestep": t,
               "encoder_hidden_states": rng.standard_normal(
                   (b, *specs["encoder_hidden_states"].shape[1:])).astype(np.float32)}
        if "class_labels" in specs:
            out["class_labels"] = self._random_input(specs["class_labels"], (b,), rng)
        if self.sdxl:
            out["text_embeds"] = rng.standard_normal((b, *specs["text_embeds"].shape[1:])).astype(np.float32)
            h, w = specs["sample"].shape[2] * VAE_SCALE, specs["sample"].shape[3] * VAE_SCALE
            # (original size, crop top-left, target size), as the SDXL pipeline builds them
            out["time_ids"] = np.tile(np.array([h, w, 0, 0, h, w], np.float32), (b, 1))
        return {s: out[s] for s in specs}
