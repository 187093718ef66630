"""The adapter table: every supported model family, listed explicitly (nothing registers on import).

Lookups: by diffusers `_class_name` (or transformers `architectures` entry), by family, and the
built-in tiny models (`builtin:<name>`, seeded random weights from the adapters' tiny configs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qcompile.errors import UserError

from .autoencoder_kl import VaeDecoderAdapter, VaeEncoderAdapter
from .base import ModelAdapter, ModelFamily
from .clip_text import ClipTextAdapter, ClipTextWithProjectionAdapter
from .flux_transformer import FluxTransformerAdapter
from .sd3_transformer import SD3TransformerAdapter
from .transformer2d import Transformer2DAdapter
from .unet2d import UNet2DAdapter
from .unet2d_condition import UNet2DConditionAdapter

# Order matters where two adapters share a class name: the first is the default (VAE -> decoder).
ADAPTERS: tuple[type[ModelAdapter], ...] = (
    UNet2DAdapter,
    UNet2DConditionAdapter,
    Transformer2DAdapter,
    SD3TransformerAdapter,
    FluxTransformerAdapter,
    VaeDecoderAdapter,
    VaeEncoderAdapter,
    ClipTextAdapter,
    ClipTextWithProjectionAdapter,
)

# The parts of a multi-adapter model that a component may name ("vae:encoder").
PARTS: dict[str, ModelFamily] = {"decoder": ModelFamily.VAE_DECODER, "encoder": ModelFamily.VAE_ENCODER}


@dataclass(frozen=True)
class Builtin:
    adapter: type[ModelAdapter]
    config: Callable[[], dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)  # adapter constructor options (sizes)

    def build(self, seed: int = 0) -> ModelAdapter:
        return self.adapter.from_config(self.config(), seed=seed, **self.options)


BUILTINS: dict[str, Builtin] = {
    "tiny-unet2d": Builtin(UNet2DAdapter, UNet2DAdapter.tiny_config),
    "tiny-sd-unet": Builtin(UNet2DConditionAdapter, UNet2DConditionAdapter.tiny_config),
    "tiny-sdxl-unet": Builtin(UNet2DConditionAdapter, UNet2DConditionAdapter.tiny_sdxl_config),
    "tiny-dit": Builtin(Transformer2DAdapter, Transformer2DAdapter.tiny_config),
    "tiny-pixart": Builtin(Transformer2DAdapter, Transformer2DAdapter.tiny_pixart_config, {"text_len": 16}),
    "tiny-sd3": Builtin(SD3TransformerAdapter, SD3TransformerAdapter.tiny_config, {"text_len": 24}),
    "tiny-flux": Builtin(FluxTransformerAdapter, FluxTransformerAdapter.tiny_config,
                         {"latent_size": 16, "text_len": 16}),
    "tiny-vae-decoder": Builtin(VaeDecoderAdapter, VaeDecoderAdapter.tiny_config),
    "tiny-vae-encoder": Builtin(VaeEncoderAdapter, VaeEncoderAdapter.tiny_config),
    "tiny-clip-text": Builtin(ClipTextAdapter, ClipTextAdapter.tiny_config),
}


def class_name_of(config: dict[str, Any]) -> str:
    """The model class a config.json names: diffusers `_class_name` or transformers `architectures[0]`."""
    name = config.get("_class_name")
    if not name and config.get("architectures"):
        name = config["architectures"][0]
    return str(name or "")


def adapter_for_class(class_name: str, part: str | None = None) -> type[ModelAdapter]:
    """The adapter that loads `class_name`; `part` picks among several ("encoder"/"decoder" for a VAE)."""
    matches = [a for a in ADAPTERS if class_name in a.class_names]
    if not matches:
        raise UserError(f"model class {class_name or '(none)'} is not supported; supported: "
                        + ", ".join(supported_classes()))
    if part is None:
        return matches[0]
    wanted = PARTS.get(part)
    for adapter in matches:
        if adapter.family is wanted:
            return adapter
    valid = [p for p, fam in PARTS.items() if any(a.family is fam for a in matches)]
    raise UserError(f"{class_name} has no part {part!r}"
                    + (f"; valid parts: {', '.join(valid)}" if valid else " (it has no parts)"))


def adapter_for_family(family: ModelFamily) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if adapter.family is family:
            return adapter
    raise KeyError(family)


def supported_classes() -> list[str]:
    return sorted({name for a in ADAPTERS for name in a.class_names})


def builtin(name: str, seed: int = 0) -> ModelAdapter:
    """`name` without the `builtin:` prefix; `reference` is resolved in source.py."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model builtin:{name}; valid: "
                        + ", ".join(f"builtin:{n}" for n in (*BUILTINS, "reference")))
    return BUILTINS[name].build(seed)
