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
