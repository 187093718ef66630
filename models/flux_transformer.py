"""FluxTransformer2DModel (FLUX.1 dev / schnell): MMDiT + single-stream blocks over packed tokens.

What diffusers 0.42.1 expects, and so what the ONNX inputs are:
- `hidden_states` is the packed latent (B, (H/2)(W/2), 4C): 2x2 latent patches flattened.
- `timestep` is sigma in [0, 1] (the pipeline passes t / 1000; the model multiplies by 1000
  inside), hence timestep_scale 1.0. `guidance` (B,) float, only when config.guidance_embeds.
- `img_ids` (tokens, 3) and `txt_ids` (text_len, 3) are 2-D float32 with no batch axis (3-D ids
  are deprecated); they feed the rotary embedding and are never quantized (role INDEX).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from qcompile.errors import UserError

from .base import InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule
from .common import DiffusersLoading, as_timesteps, noise_flow, smooth_latent

DEFAULT_LATENT = 128  # 1024 px images through the 8x VAE
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev pipeline default


class _Export(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


class FluxTransformerAdapter(DiffusersLoading, ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.FLUX_TRANSFORMER
    class_names: ClassVar[tuple[str, ...]] = ("FluxTransformer2DModel",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.FLOW
    output_names: ClassVar[tuple[str, ...]] = ("out_sample",)

    def __init__(self, module: torch.nn.Module, *, latent_size: int = DEFAULT_LATENT, text_len: int = 512):
        """`latent_size`: latent height = width (image size / 8); `text_len`: T5 tokens (512 dev, 256 schnell)."""
        super().__init__(module)
        if latent_size % 2:
            raise UserError(f"Flux latent size must be even (2x2 packing), got {latent_size}")
        self.latent_size = latent_size
        self.text_len = text_len

    @property
    def timestep_scale(self) -> float:
        return 1.0

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """FLUX.1-dev-shaped (guidance embedding): 1 double + 1 single block, 2 heads of 16.

        in_channels 16 = a 4-channel latent packed 2x2; rope axes (4, 6, 6) sum to the head dim.
        Use it with latent_size=16 (64 image tokens), as the built-in does.
        """
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
        }

    @property
    def latent_channels(self) -> int:
        return self.module.config.in_channels // 4

    def fixed_reason(self, name: str, dim: int) -> str:
        if (name, dim) in (("hidden_states", 1), ("encoder_hidden_states", 1), ("img_ids", 0), ("txt_ids", 0)):
            return ("token counts are fixed: the positional ids (img_ids, txt_ids) have no batch axis and carry "
                    "the token grid; export at the latent size and prompt length you run")
        return super().fixed_reason(name, dim)

    def input_specs(self) -> tuple[InputSpec, ...]:
        cfg = self.module.config
        tokens = (self.latent_size // 2) ** 2
        specs = [
            InputSpec("hidden_states", (1, tokens, cfg.in_channels), "float32", InputRole.SAMPLE),
            InputSpec("encoder_hidden_states", (1, self.text_len, cfg.joint_attention_dim), "float32",
                      InputRole.CONDITIONING),
            InputSpec("pooled_projections", (1, cfg.pooled_projection_dim), "float32", InputRole.CONDITIONING),
            InputSpec("timestep", (1,), "float32", InputRole.TIMESTEP),
            InputSpec("img_ids", (tokens, 3), "float32", InputRole.INDEX, batched=False),
            InputSpec("txt_ids", (self.text_len, 3), "float32", InputRole.INDEX, batched=False),
        ]
        if cfg.guidance_embeds:
            specs.append(InputSpec("guidance", (1,), "float32", InputRole.CONDITIONING))
        return tuple(specs)

    def export_module(self) -> torch.nn.Module:
        return _Export(self.module)

    def default_float_scopes(self) -> tuple[str, ...]:
        return (r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)(\.|$)",)

    # --- example inputs -----------------------------------------------------------------------
    def image_ids(self) -> np.ndarray:
        """(tokens, 3) rows (0, row, col) of the packed grid, as the pipeline's _prepare_latent_image_ids."""
        n = self.latent_size // 2
        rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)

    def pack(self, latent: np.ndarray) -> np.ndarray:
        """(B, C, H, W) -> (B, (H/2)(W/2), 4C), the pipeline's _pack_latents."""
        b, c, h, w = latent.shape
        x = latent.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))

    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.name == "img_ids":
            return self.image_ids()
        if spec.name == "txt_ids":
            return np.zeros(shape, np.float32)
        if spec.name == "guidance":
            return rng.uniform(1.0, 5.0, size=shape).astype(np.float32)
        return super()._random_input(spec, shape, rng)

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        t = as_timesteps(timesteps)
        rng = np.random.default_rng(seed)
        specs = {s.name: s for s in self.input_specs()}
        b = len(t)
        x0 = smooth_latent(rng, (b, self.latent_channels, self.latent_size, self.latent_size))
        out = {
            "hidden_states": self.pack(noise_flow(x0, t / self.timestep_scale, rng)),
            "encoder_hidden_states": rng.standard_normal(
                (b, *specs["encoder_hidden_states"].shape[1:])).astype(np.float32),
            "pooled_projections": rng.standard_normal(
                (b, *specs["pooled_projections"].shape[1:])).astype(np.float32),
            "timestep": t,
            "img_ids": self.image_ids(),
            "txt_ids": np.zeros(specs["txt_ids"].shape, np.float32),
        }
        if "guidance" in specs:
            out["guidance"] = np.full((b,), DEFAULT_GUIDANCE, np.float32)
        return {name: out[name] for name in specs}
