"""One sampling loop, written once, that drives any denoiser: torch, the float ONNX, or an artifact's Runner.

Real diffusers schedulers step the latents; the denoiser only maps (x_t, t, conditioning) to a noise
prediction in numpy. Classifier-free guidance runs uncond and cond as one batch [uncond; cond], as
diffusers pipelines do. A hook sees every denoiser call with its timestep value and which half is
which, which is what calibration recording and teacher-forced evaluation need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from qcompile.config import SamplerSettings, SchedulerKind


def make_scheduler(kind: SchedulerKind, config: dict[str, Any]):
    """A diffusers scheduler of `kind` built from a (DDPM) training scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if kind is SchedulerKind.DDIM:
        return DDIMScheduler.from_config(config)
    if kind is SchedulerKind.EULER:
        return EulerDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


class Denoiser(Protocol):
    def __call__(self, sample: np.ndarray, timestep: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """Noise prediction for a batch; `timestep` is (B,) float32, `cond` the conditioning input."""


@dataclass(frozen=True, eq=False)
class DenoiserCall:
    """What a hook sees at each call: the timestep value, the batched input and the guided output."""

    step: int
    timestep: float
    sample: np.ndarray  # x_t as fed to the model (after scale_model_input), (B, ...) or (2B, ...) with CFG
    cond: np.ndarray
    eps: np.ndarray  # raw model output for the same batch
    cfg: bool  # True: first half uncond, second half cond


def initial_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


def guided(eps: np.ndarray, guidance: float) -> np.ndarray:
    """Combine a [uncond; cond] batch into the prediction the sampler consumes."""
    uncond, cond = np.split(eps, 2)
    return uncond + guidance * (cond - uncond)


def sample(denoiser: Denoiser, settings: SamplerSettings, *, cond: np.ndarray, uncond: np.ndarray | None,
           latent_shape: tuple[int, ...], scheduler_config: dict[str, Any],
           hook: Callable[[DenoiserCall], None] | None = None) -> np.ndarray:
    """Run the sampler from seeded noise; returns the final latents (B, *latent_shape[1:])."""
    scheduler = make_scheduler(settings.scheduler, scheduler_config)
    scheduler.set_timesteps(settings.steps)
    use_cfg = uncond is not None and settings.guidance != 1.0
    x = torch.from_numpy(initial_noise(latent_shape, settings.seed)) * scheduler.init_noise_sigma
    cond_batch = np.concatenate([uncond, cond]) if use_cfg else cond
    for step, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t).numpy().astype(np.float32)
        batch_in = np.concatenate([model_in, model_in]) if use_cfg else model_in
        t_value = float(t)
        t_batch = np.full(len(batch_in), t_value, np.float32)
        eps = np.asarray(denoiser(batch_in, t_batch, cond_batch), np.float32)
        if hook is not None:
            hook(DenoiserCall(step, t_value, batch_in, cond_batch, eps, use_cfg))
        eps_used = guided(eps, settings.guidance) if use_cfg else eps
        x = scheduler.step(torch.from_numpy(eps_used), t, x).prev_sample
    return x.numpy()
