"""DiT and PixArt: patch transformers with adaptive norms (DiTTransformer2DModel,
PixArtTransformer2DModel, and legacy Transformer2DModel configs with norm_type ada_norm_zero/single).

DiT is class-conditional (`class_labels`, int64; label `num_embeds_ada_norm` is the null class that
classifier-free guidance uses). PixArt cross-attends to T5 embeddings (`encoder_hidden_states`) and,
when `use_additional_conditions` (the 1024px models), takes `added_cond_kwargs` resolution and
aspect ratio, exported as the inputs `resolution` (B, 2) and `aspect_ratio` (B, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from qcompile.errors import UserError

from .base import Axis, InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule, tokens_axis
from .common import LINEAR, DiffusersLoading, as_timesteps, hw, noise_ddpm, smooth_latent

VAE_SCALE = 8


class _DiTExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels,
                          return_dict=False)[0]


class _PixArtExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          timestep=timestep, added_cond_kwargs=added, return_dict=False)[0]


class Transformer2DAdapter(DiffusersLoading, ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.TRANSFORMER2D
    class_names: ClassVar[tuple[str, ...]] = ("DiTTransformer2DModel", "PixArtTransformer2DModel",
                                              "Transformer2DModel")
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.DDPM
    output_names: ClassVar[tuple[str, ...]] = ("out_sample",)

    def __init__(self, module: torch.nn.Module, *, text_len: int = 120,
                 schedule: tuple[str, float, float] = LINEAR):
        """`text_len`: T5 tokens for PixArt (120 alpha, 300 sigma); `schedule`: synthetic-input betas."""
        super().__init__(module)
        self.schedule = schedule
        self.kind = _kind(dict(module.config), type(module).__name__)
        self.text_len = text_len
        self.additional = self.kind == "pixart" and bool(getattr(module, "use_additional_conditions", False))

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        import diffusers

        name = config.get("_class_name", "")
        _kind(config, name)  # refuses Transformer2DModel configs that are neither DiT nor PixArt
        return getattr(diffusers, name)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """DiT-shaped: 2 blocks, 2 heads of 16, patch 2 on a 4x16x16 latent, 10 classes."""
        return {
            "_class_name": "DiTTransformer2DModel",
            "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
            "num_layers": 2, "norm_num_groups": 8, "sample_size": 16, "patch_size": 2,
            "num_embeds_ada_norm": 10,
        }

    @classmethod
    def tiny_pixart_config(cls) -> dict[str, Any]:
        """PixArt-shaped, with the resolution / aspect-ratio conditions of the 1024px models.

        Width 48: the size conditions take a third of it each (1152 = 3 x 384 in the real model).
        """
        return {
            "_class_name": "PixArtTransformer2DModel",
            "num_attention_heads": 3, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
            "num_layers": 2, "norm_num_groups": 8, "sample_size": 16, "patch_size": 2,
            "cross_attention_dim": 48, "caption_channels": 24, "use_additional_conditions": True,
        }

    def input_specs(self) -> tuple[InputSpec, ...]:
        cfg = self.module.config
        h, w = hw(cfg.sample_size)
        sample = InputSpec("hidden_states", (1, cfg.in_channels, h, w), "float32", InputRole.SAMPLE)
        timestep = InputSpec("timestep", (1,), "float32", InputRole.TIMESTEP)
        if self.kind == "dit":
            return (sample, timestep, InputSpec("class_labels", (1,), "int64", InputRole.INDEX))
        text_dim = cfg.caption_channels or cfg.cross_attention_dim
        specs = [sample, InputSpec("encoder_hidden_states", (1, self.text_len, text_dim), "float32",
                                   InputRole.CONDITIONING), timestep]
        if self.additional:
            specs += [InputSpec("resolution", (1, 2), "float32", InputRole.CONDITIONING),
                      InputSpec("aspect_ratio", (1, 1), "float32", InputRole.CONDITIONING)]
        return tuple(specs)

    def export_module(self) -> torch.nn.Module:
        return _DiTExport(self.module) if self.kind == "dit" else _PixArtExport(self.module)

    def dynamic_axes(self) -> dict[str, dict[int, Axis]]:
        """PixArt's caption length: any (cross-attention keys). Latent H/W stay fixed (fixed_reason)."""
        return {} if self.kind == "dit" else {"encoder_hidden_states": {1: tokens_axis(self.text_len)}}

    def fixed_reason(self, name: str, dim: int) -> str:
        if name == "hidden_states" and dim >= 2:
            return ("PatchEmbed keeps a sin-cos table for the config's sample_size and recomputes it in a Python "
                    "branch for other sizes, which the exported graph cannot keep: export at the size you run")
        return super().fixed_reason(name, dim)

    def default_float_scopes(self) -> tuple[str, ...]:
        if self.kind == "dit":  # DiT's timestep/label embedding sits in every block's norm1.emb
            return (r"^pos_embed(\.|$)", r"^transformer_blocks\.\d+\.norm1\.emb(\.|$)", r"^proj_out")
        return (r"^pos_embed(\.|$)", r"^adaln_single(\.|$)", r"^caption_projection(\.|$)", r"^proj_out(\.|$)")

    # --- example inputs -----------------------------------------------------------------------
    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.name == "class_labels":  # labels 0..n-1 plus n, the null class
            return rng.integers(0, self.module.config.num_embeds_ada_norm + 1, size=shape).astype(np.int64)
        if spec.name in ("resolution", "aspect_ratio"):
            return self._size_conditions(shape[0])[spec.name]
        return super()._random_input(spec, shape, rng)

    def _size_conditions(self, batch: int) -> dict[str, np.ndarray]:
        h, w = hw(self.module.config.sample_size)
        h, w = h * VAE_SCALE, w * VAE_SCALE  # what the pipeline passes: image height and width
        return {"resolution": np.tile(np.array([[h, w]], np.float32), (batch, 1)),
                "aspect_ratio": np.full((batch, 1), h / w, np.float32)}

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        """By default the linear 1e-4..0.02 betas DiT and PixArt train with. DiT labels: every other sample
        gets the null class, as the guided halves of a CFG batch do."""
        t = as_timesteps(timesteps)
        rng = np.random.default_rng(seed)
        specs = {s.name: s for s in self.input_specs()}
        b = len(t)
        x0 = smooth_latent(rng, (b, *specs["hidden_states"].shape[1:]))
        out = {"hidden_states": noise_ddpm(x0, t, rng, self.schedule), "timestep": t}
        if self.kind == "dit":
            n = self.module.config.num_embeds_ada_norm
            labels = rng.integers(0, n, size=b).astype(np.int64)
            labels[1::2] = n
            out["class_labels"] = labels
        else:
            out["encoder_hidden_states"] = rng.standard_normal(
                (b, *specs["encoder_hidden_states"].shape[1:])).astype(np.float32)
            if self.additional:
                out.update(self._size_conditions(b))
        return {name: out[name] for name in specs}


def _kind(config: dict[str, Any], class_name: str) -> str:
    norm = config.get("norm_type")
    if class_name == "DiTTransformer2DModel" or (class_name == "Transformer2DModel" and norm == "ada_norm_zero"):
        return "dit"
    if class_name == "PixArtTransformer2DModel" or (class_name == "Transformer2DModel"
                                                    and norm == "ada_norm_single"):
        return "pixart"
    raise UserError(f"{class_name} with norm_type={norm!r} is not a DiT or PixArt model: only those "
                    "Transformer2DModel kinds can be compiled as denoisers")
