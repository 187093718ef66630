"""Fidelity metrics. Each compares a test array against a reference computed on the same input."""

from __future__ import annotations

import numpy as np

# Reported when the error is exactly zero (a float64 SQNR would be +inf, which JSON cannot hold).
MAX_DB = 200.0


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |test - ref|^2)."""
    ref = np.asarray(ref, np.float64)
    err = float(np.sum((np.asarray(test, np.float64) - ref) ** 2))
    sig = float(np.sum(ref**2))
    if err == 0.0:
        return MAX_DB
    if sig == 0.0:
        return -MAX_DB
    return float(min(MAX_DB, 10.0 * np.log10(sig / err)))


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if denom == 0.0 else float(np.dot(a, b) / denom)


def relative_error(ref: np.ndarray, test: np.ndarray) -> float:
    """|test - ref| / |ref| (the CFG-gap ratio when given cond - uncond differences)."""
    ref = np.asarray(ref, np.float64)
    denom = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(np.asarray(test, np.float64) - ref))
    return 0.0 if denom == 0.0 and num == 0.0 else num / max(denom, 1e-30)


def psnr_db(ref: np.ndarray, test: np.ndarray, data_range: float = 2.0) -> float:
    """Peak SNR for images in [-1, 1] (data_range 2)."""
    mse = float(np.mean((np.asarray(test, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return MAX_DB if mse == 0.0 else float(min(MAX_DB, 10.0 * np.log10(data_range**2 / mse)))


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    k = len(g)
    h, w = img.shape[-2:]
    rows = sum(g[i] * img[..., i:h - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[..., :, j:w - k + 1 + j] for j in range(k))


def ssim(ref: np.ndarray, test: np.ndarray, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window 7, sigma 1.5, K1 0.01, K2 0.03)
    over images (..., H, W); images smaller than the window use the whole image as one window."""
    x = np.asarray(ref, np.float64)
    y = np.asarray(test, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size = min(7, x.shape[-1], x.shape[-2])
    g = _gaussian_window(size, 1.5 * size / 7)
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx**2
    syy = _blur(y * y, g) - my**2
    sxy = _blur(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the FID formula.

    tr(sqrt(S_a S_b)) is computed as the trace of sqrt(sqrt(S_a) S_b sqrt(S_a)), a symmetric PSD
    matrix, so numpy's eigh suffices (no scipy).
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)
