"""Fidelity through a real sampling loop: per step (teacher-forced), per sample, per set.

- Per step: the float model samples; at every denoiser call the artifact is fed the *same* x_t and
  conditioning, and the guided noise predictions are compared (SQNR, cosine), together with the
  CFG gap (cond - uncond), whose loss silently removes the conditioning.
- Per sample: the artifact samples on its own from the same seeds; PSNR and SSIM against the float
  samples.
- Per set: class accuracy by the model's judge and the Fréchet distance to real data in the judge's
  feature space, for float and artifact alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qcompile.config import FidelitySettings
from qcompile.evaluation.metrics import cosine, frechet_distance, psnr_db, relative_error, sqnr_db, ssim
from qcompile.evaluation.report import figure_png_base64
from qcompile.evaluation.sampling import DenoiserCall, guided, sample
from qcompile.evaluation.validate import StepResult
from qcompile.target import Runner


class SamplingSetup(Protocol):
    """What a model family that can sample provides (the reference model does)."""

    cond_input: str  # ONNX input the conditioning goes to
    latent_shape: tuple[int, ...]  # one sample's latent shape
    scheduler_config: dict[str, Any]

    def labels(self, per_class: int) -> np.ndarray: ...

    def conditioning(self, labels: np.ndarray) -> np.ndarray: ...

    def null_conditioning(self, count: int) -> np.ndarray: ...

    def judge(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted labels, features) for images in [-1, 1]."""

    def data_features(self) -> np.ndarray:
        """Judge features of held-out real data, for the Fréchet distance."""


@dataclass(frozen=True, eq=False)
class FidelityResult:
    steps: list[StepResult]
    summary: dict[str, float]
    images_fp32: np.ndarray
    images_q: np.ndarray
    labels: np.ndarray


def _denoiser(runner: Runner, sample_name: str, timestep_name: str, cond_name: str):
    def call(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return np.asarray(runner.run({sample_name: x, timestep_name: t, cond_name: cond}))

    return call


def evaluate_sampling(reference: Runner, artifact: Runner, setup: SamplingSetup, settings: FidelitySettings, *,
                      sample_name: str, timestep_name: str, bucket_of=lambda t: 0) -> FidelityResult:
    labels = setup.labels(settings.per_class)
    cond = setup.conditioning(labels)
    uncond = setup.null_conditioning(len(labels))
    shape = (len(labels), *setup.latent_shape)
    ref_fn = _denoiser(reference, sample_name, timestep_name, setup.cond_input)
    q_fn = _denoiser(artifact, sample_name, timestep_name, setup.cond_input)
    steps: list[StepResult] = []
    guidance = settings.sampler.guidance

    def teacher_forced(call: DenoiserCall) -> None:
        q_eps = q_fn(call.sample, np.full(len(call.sample), call.timestep, np.float32), call.cond)
        if call.cfg:
            ref_g, q_g = guided(call.eps, guidance), guided(q_eps, guidance)
            ref_u, ref_c = np.split(call.eps, 2)
            q_u, q_c = np.split(q_eps, 2)
            gap = relative_error(ref_c - ref_u, q_c - q_u)
        else:
            ref_g, q_g, gap = call.eps, q_eps, None
        steps.append(StepResult(call.timestep, bucket_of(call.timestep), sqnr_db(ref_g, q_g), cosine(ref_g, q_g),
                                None if gap is None else round(gap, 6)))

    common = {"cond": cond, "uncond": uncond, "latent_shape": shape, "scheduler_config": setup.scheduler_config}
    images_fp32 = np.clip(sample(ref_fn, settings.sampler, hook=teacher_forced, **common), -1, 1)
    images_q = np.clip(sample(q_fn, settings.sampler, **common), -1, 1)

    pred_fp32, feat_fp32 = setup.judge(images_fp32)
    pred_q, feat_q = setup.judge(images_q)
    data = setup.data_features()
    gaps = [s.cfg_gap_ratio for s in steps if s.cfg_gap_ratio is not None]
    summary = {
        "sample_psnr_db": round(float(np.mean([psnr_db(a, b) for a, b in zip(images_fp32, images_q, strict=True)])),
                                4),
        "sample_ssim": round(float(np.mean([ssim(a, b) for a, b in zip(images_fp32, images_q, strict=True)])), 5),
        "accuracy_fp32": round(float(np.mean(pred_fp32 == labels)), 4),
        "accuracy_q": round(float(np.mean(pred_q == labels)), 4),
        "frechet_fp32": round(frechet_distance(feat_fp32, data), 4),
        "frechet_q": round(frechet_distance(feat_q, data), 4),
        "cfg_gap_ratio_mean": round(float(np.mean(gaps or [np.nan])), 6),
        "cfg_gap_ratio_max": round(float(np.max(gaps)), 6) if gaps else None,
    }
    return FidelityResult(steps, summary, images_fp32, images_q, labels)


def sample_grid_png(result: FidelityResult, per_class: int = 8) -> str:
    """Base64 PNG: float samples left, artifact samples right, one row per class, same seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.unique(result.labels)
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.45 * len(classes) + 0.8), dpi=100)
    for ax, images, title in ((axes[0], result.images_fp32, "fp32"), (axes[1], result.images_q, "quantized")):
        rows = []
        for c in classes:
            idx = np.nonzero(result.labels == c)[0][:per_class]
            rows.append(np.concatenate([images[i, 0] for i in idx], axis=1))
        ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return figure_png_base64(fig)
