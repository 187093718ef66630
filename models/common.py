"""Helpers the adapters share: seeded construction, local loading, synthetic latents, noise schedules.

Kept apart from base.py so the contract stays a short read; nothing here is family-specific.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompile.errors import UserError

log = logging.getLogger("qcompile.models")

# SD-style "scaled_linear" schedule (SD 1.x/2.x/XL) and the plain "linear" one (DDPM, DiT, PixArt).
SCALED_LINEAR = ("scaled_linear", 0.00085, 0.012)
LINEAR = ("linear", 0.0001, 0.02)


def schedule_from_config(config: dict[str, Any]) -> tuple[str, float, float] | None:
    """The (beta_schedule, beta_start, beta_end) of a diffusers scheduler config, when it is one we model."""
    kind = config.get("beta_schedule")
    if kind not in ("linear", "scaled_linear"):
        return None
    return (kind, float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))


def alphas_cumprod(schedule: tuple[str, float, float] = SCALED_LINEAR, steps: int = 1000) -> np.ndarray:
    """abar_t of a diffusers DDPM-family beta schedule (float64, length `steps`)."""
    kind, start, end = schedule
    if kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}")
    return np.cumprod(1.0 - betas)


def smooth_latent(rng: np.random.Generator, shape: tuple[int, ...], std: float = 0.8) -> np.ndarray:
    """Low-frequency random field of `shape` (B, C, H, W): coarse noise upsampled bilinearly.

    Real latents are spatially correlated; white noise would give calibration statistics of a
    different kind (far more high-frequency energy than any encoded image has).
    """
    b, c, h, w = shape
    coarse = rng.standard_normal((b, c, max(2, h // 4), max(2, w // 4))).astype(np.float32)
    fine = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear",
                                           align_corners=False).numpy()
    fine += 0.15 * rng.standard_normal(fine.shape).astype(np.float32)  # a little detail
    fine -= fine.mean(axis=(1, 2, 3), keepdims=True)
    fine *= std / (fine.std(axis=(1, 2, 3), keepdims=True) + 1e-8)
    return fine.astype(np.float32)


def noise_ddpm(x0: np.ndarray, timesteps: np.ndarray, rng: np.random.Generator,
               schedule: tuple[str, float, float] = SCALED_LINEAR) -> np.ndarray:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar interpolated at (float) t."""
    abar = alphas_cumprod(schedule)
    a = np.interp(np.clip(timesteps, 0, len(abar) - 1), np.arange(len(abar)), abar)
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))
    eps = rng.standard_normal(x0.shape)
    return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * eps).astype(np.float32)


def noise_flow(x0: np.ndarray, sigmas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x_t = (1 - s) x0 + s eps (rectified flow; s in [0, 1])."""
    s = np.clip(sigmas, 0.0, 1.0).reshape(-1, *([1] * (x0.ndim - 1)))
    eps = rng.standard_normal(x0.shape)
    return ((1.0 - s) * x0 + s * eps).astype(np.float32)


def as_timesteps(timesteps: Any) -> np.ndarray:
    t = np.asarray(list(timesteps), dtype=np.float32).reshape(-1)
    if t.size == 0:
        raise UserError("synthetic calibration needs at least one timestep")
    return t


def seeded_build(build, seed: int) -> torch.nn.Module:
    """Construct a module with torch's global RNG seeded, restoring the caller's RNG state after."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


def strip_class_name(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without the bookkeeping keys (`_class_name`, `_diffusers_version`, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def safe_loading(folder: Path) -> dict[str, Any]:
    """`from_pretrained` options for a local folder: never the hub, and safetensors whenever the folder
    has them (a pickled `.bin` can run code; it is read only when nothing else is there, and said so)."""
    has_safetensors = any(Path(folder).rglob("*.safetensors"))
    if not has_safetensors and any(Path(folder).rglob("*.bin")):
        log.warning("%s: no .safetensors weights; loading the pickled .bin files", folder)
    return {"local_files_only": True, "use_safetensors": has_safetensors}


def load_diffusers(cls, folder: Path) -> torch.nn.Module:
    """`cls.from_pretrained(folder)` from local files only, as float32, errors as one-line UserErrors."""
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32, **safe_loading(folder)).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder}: could not load {cls.__name__} weights: {first}") from exc


def scope_regex(*names: str) -> str:
    """A regex matching any of the module paths `names` and everything below them."""
    return r"^(" + "|".join(re.escape(n) for n in names) + r")(\.|$)"


def read_config(folder: Path) -> dict[str, Any]:
    """The config.json of a model folder, or a one-line UserError."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json, so this is not a diffusers/transformers model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path}: holds a JSON {type(config).__name__}, not the object of a model config")
    return config


class DiffusersLoading:
    """from_pretrained / from_config for adapters whose module is one diffusers ModelMixin class.

    The adapter supplies `_module_class(config)`; keyword options (sizes such as `text_len`) pass
    through to the adapter's constructor.
    """

    @classmethod
    def _module_class(cls, config: dict[str, Any]) -> type:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, folder: Path, **options: Any):
        config = read_config(Path(folder))
        return cls(load_diffusers(cls._module_class(config), Path(folder)), **options)

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0, **options: Any):
        module_cls = cls._module_class(config)
        return cls(seeded_build(lambda: module_cls.from_config(strip_class_name(config)), seed), **options)


def hw(size: Any) -> tuple[int, int]:
    """(H, W) from a diffusers `sample_size` (an int or a pair)."""
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)
