"""transformers CLIPTextModel / CLIPTextModelWithProjection: the SD-family text encoders.

Input `input_ids` (B, max_position_embeddings) int64, padded to full length as diffusers pipelines
do. Outputs: `last_hidden_state`, plus `text_embeds` (the projected pooled embedding SDXL's second
encoder and SD3 use) for the WithProjection class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qcompile.errors import UserError

from .base import InputRole, InputSpec, ModelAdapter, ModelFamily, NoiseSchedule
from .common import as_timesteps, read_config, safe_loading, seeded_build


class _Export(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, projected: bool):
        super().__init__()
        self.model = model
        self.projected = projected

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, return_dict=True)
        if self.projected:
            return out.last_hidden_state, out.text_embeds
        return out.last_hidden_state


class ClipTextAdapter(ModelAdapter):
    family: ClassVar[ModelFamily] = ModelFamily.CLIP_TEXT
    class_names: ClassVar[tuple[str, ...]] = ("CLIPTextModel",)
    noise_schedule: ClassVar[NoiseSchedule] = NoiseSchedule.NONE
    output_names: ClassVar[tuple[str, ...]] = ("last_hidden_state",)
    _projected: ClassVar[bool] = False

    @classmethod
    def _model_class(cls) -> type:
        from transformers import CLIPTextModel

        return CLIPTextModel

    @classmethod
    def from_pretrained(cls, folder: Path) -> ModelAdapter:
        read_config(Path(folder))  # a clear error when config.json is missing
        try:
            module = cls._model_class().from_pretrained(str(folder), dtype=torch.float32, **safe_loading(folder))
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{folder}: could not load {cls._model_class().__name__}: {first}") from exc
        return cls(module)

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0) -> ModelAdapter:
        from transformers import CLIPTextConfig

        cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if k != "architectures"})
        return cls(seeded_build(lambda: cls._model_class()(cfg), seed))

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """2 layers, width 32, 16 tokens; bos/eos at the top of a 1000-token vocabulary like CLIP's."""
        return {
            "architectures": [cls.class_names[0]], "model_type": "clip_text_model",
            "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
            "hidden_act": "quick_gelu", "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1,
        }

    def input_specs(self) -> tuple[InputSpec, ...]:
        length = self.module.config.max_position_embeddings
        return (InputSpec("input_ids", (1, length), "int64", InputRole.INDEX),)

    def fixed_reason(self, name: str, dim: int) -> str:
        if dim == 1:
            return "diffusers pipelines pad every prompt to max_position_embeddings tokens"
        return super().fixed_reason(name, dim)

    def export_module(self) -> torch.nn.Module:
        return _Export(self.module, self._projected)

    def default_float_scopes(self) -> tuple[str, ...]:
        # transformers 5 CLIPTextModel has no `text_model.` level; the WithProjection class keeps it
        return (r"^((text_model\.)?(embeddings|final_layer_norm)|text_projection)(\.|$)",)

    def token_ids(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Prompts as the tokenizer pads them: bos, 1..length-2 word tokens, eos, eos padding."""
        cfg = self.module.config
        length = cfg.max_position_embeddings
        bos, eos = cfg.bos_token_id, cfg.eos_token_id
        words_max = max(1, min(bos, eos, cfg.vocab_size) - 1)
        ids = np.full((batch, length), eos, np.int64)
        ids[:, 0] = bos
        for row in ids:
            n = int(rng.integers(1, length - 1))
            row[1:1 + n] = rng.integers(0, words_max, size=n)
        return ids

    def _random_input(self, spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if spec.name == "input_ids":
            return self.token_ids(shape[0], rng)
        return super()._random_input(spec, shape, rng)

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        n = len(as_timesteps(timesteps))
        return {"input_ids": self.token_ids(n, np.random.default_rng(seed))}


class ClipTextWithProjectionAdapter(ClipTextAdapter):
    class_names: ClassVar[tuple[str, ...]] = ("CLIPTextModelWithProjection",)
    output_names: ClassVar[tuple[str, ...]] = ("last_hidden_state", "text_embeds")
    _projected: ClassVar[bool] = True

    @classmethod
    def _model_class(cls) -> type:
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection
