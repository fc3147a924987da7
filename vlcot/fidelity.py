"""PSNR and SSIM on the Y channel, written out so identical images give exactly inf and 1.

Conventions (those of pyiqa `psnr`/`ssim` with `test_y_channel=True, color_space='ycbcr'`,
which recent Real-ISR papers report): Y is ITU-R BT.601 luma, 16 + (65.481 R + 128.553 G +
24.966 B) with RGB in [0, 1]. PSNR uses Y / 255 in [0, 1] unrounded; SSIM uses Y rounded to
0..255 in float64, an 11-tap Gaussian window (sigma 1.5) over the valid region, and clamps
the contrast-structure term at 0. `crop_border` pixels are removed from every side first.

It sits in vlcot/, the lowest layer, because both evaluation/ (the PSNR/SSIM columns) and the
VQ trainer's reconstruction check (vlcot/vq_train.py) use it: one definition, imported downward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_Y = np.array([65.481, 128.553, 24.966])


def y_channel(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float64 [H, W] BT.601 luma in 0..255 (unrounded)."""
    rgb = np.asarray(img, dtype=np.float64) / 255.0
    return rgb @ _Y + 16.0


def _crop(a: np.ndarray, b: np.ndarray, border: int):
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return a, b


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    a, b = _crop(y_channel(sr) / 255.0, y_channel(hr) / 255.0, crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma * sigma))
    return torch.from_numpy(g / g.sum())[None, None]


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    a, b = _crop(np.round(y_channel(sr)), np.round(y_channel(hr)), crop_border)
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape}")
    x, y = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    win = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = F.conv2d(x, win), F.conv2d(y, win)
    s11 = F.conv2d(x * x, win) - mu1 ** 2
    s22 = F.conv2d(y * y, win) - mu2 ** 2
    s12 = F.conv2d(x * y, win) - mu1 * mu2
    cs = F.relu((2 * s12 + c2) / (s11 + s22 + c2))
    return float((((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1)) * cs).mean())
