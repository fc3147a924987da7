"""Blur kernels of the Real-ESRGAN degradation family, written from their formulas.

All kernels are odd-sized, sum to 1 and are returned as float64 numpy arrays. For the
anisotropic ones the covariance is R(theta) diag(sx^2, sy^2) R(theta)^T.
"""

from __future__ import annotations

import numpy as np
from scipy.special import j1

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _mahalanobis_sq(size: int, sx: float, sy: float, theta: float) -> np.ndarray:
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sx * sx, sy * sy]) @ rot.T
    inv = np.linalg.inv(cov)
    return inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y


def _normalise(k: np.ndarray) -> np.ndarray:
    return k / k.sum()


def gaussian_kernel(size: int, sx: float, sy: float, theta: float) -> np.ndarray:
    return _normalise(np.exp(-0.5 * _mahalanobis_sq(size, sx, sy, theta)))


def generalized_gaussian_kernel(size: int, sx: float, sy: float, theta: float, beta: float) -> np.ndarray:
    return _normalise(np.exp(-0.5 * np.power(_mahalanobis_sq(size, sx, sy, theta), beta)))


def plateau_kernel(size: int, sx: float, sy: float, theta: float, beta: float) -> np.ndarray:
    return _normalise(1.0 / (1.0 + np.power(_mahalanobis_sq(size, sx, sy, theta), beta)))


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Circular low-pass (2-D sinc / jinc) with cut-off frequency omega_c in (0, pi]."""
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * j1(omega_c * r) / (2 * np.pi * r)
    k[half, half] = omega_c**2 / (4 * np.pi)
    return _normalise(k)


def kernel_std(kernel: np.ndarray) -> float:
    """Per-axis spatial spread of a kernel: sqrt(E[x^2 + y^2] / 2) under the kernel's weights.
    A Gaussian of std s gives s; a delta gives 0; ringing lobes can only lower it."""
    half = kernel.shape[0] // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    second = float((kernel * (x * x + y * y)).sum() / kernel.sum()) / 2.0
    return float(np.sqrt(max(second, 0.0)))


def random_kernel(rng: np.random.Generator, cfg) -> tuple[np.ndarray, dict]:
    """Draw one kernel per a `BlurConfig`; returns (kernel, parameters drawn)."""
    size = int(rng.choice(cfg.kernel_sizes))
    if rng.random() < cfg.sinc_prob:
        lo = np.pi / 3 if size < 13 else np.pi / 5
        omega = float(rng.uniform(lo, np.pi))
        return sinc_kernel(size, omega), {"type": "sinc", "size": size, "omega_c": omega}
    probs = np.asarray(cfg.kernel_probs, dtype=np.float64)
    ktype = str(rng.choice(cfg.kernel_types, p=probs / probs.sum()))
    sx = float(rng.uniform(*cfg.sigma))
    if ktype.endswith("_aniso") or ktype == "aniso":
        sy = float(rng.uniform(*cfg.sigma))
        theta = float(rng.uniform(-np.pi, np.pi))
    else:
        sy, theta = sx, 0.0
    params = {"type": ktype, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if ktype.startswith("generalized"):
        lo, hi = cfg.betag
        if cfg.betag_split and lo < 1.0 < hi:  # Real-ESRGAN: below 1 half of the time, above 1 the other half
            beta = float(rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi))
        else:
            beta = float(rng.uniform(lo, hi))
        params["beta"] = beta
        return generalized_gaussian_kernel(size, sx, sy, theta, beta), params
    if ktype.startswith("plateau"):
        beta = float(rng.uniform(*cfg.betap))
        params["beta"] = beta
        return plateau_kernel(size, sx, sy, theta, beta), params
    return gaussian_kernel(size, sx, sy, theta), params
