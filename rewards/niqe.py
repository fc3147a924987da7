"""Offline NIQE: pristine-image statistics fitted by this project on the built-in photographs.

pyiqa's NIQE compares an image's natural-scene-statistics features (36 per 96-px block:
AGGD fits of the normalised luminance and of its pairwise products, at two scales) with a
multivariate Gaussian fitted on pristine images. Its own parameters are a download; ours
come from `fit_pristine` over the 11 built-in photographs at their original resolution,
keeping the sharpest blocks of each image (local-std sharpness above 0.75 x the image's
maximum, as in Mittal et al. 2013). Regenerate with:

    .venv-iqa/bin/python -m rewards.niqe          # writes rewards/data/niqe_pristine_builtin.mat

Runs where pyiqa is installed (the IQA environment on CPU machines).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np

from vlcot.data import builtin_candidates

BUILTIN_PRISTINE = Path(__file__).parent / "data" / "niqe_pristine_builtin.mat"
BLOCK = 96
SHARPNESS_FRACTION = 0.75


def _y_channel(rgb: np.ndarray):
    import torch
    from pyiqa.archs.func_util import diff_round
    from pyiqa.utils.color_util import to_y_channel

    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return diff_round(to_y_channel(x, 255, "yiq")).to(torch.float64)


def block_features(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (features [n_blocks, 36], sharpness [n_blocks]) exactly as pyiqa's
    `niqe()` computes them, plus each block's mean local standard deviation."""
    import torch
    import torch.nn.functional as F
    from pyiqa.archs.func_util import normalize_img_with_gauss
    from pyiqa.archs.niqe_arch import compute_feature
    from pyiqa.matlab_utils import blockproc, imresize

    img = _y_channel(rgb)
    h, w = img.shape[-2:]
    nh, nw = h // BLOCK, w // BLOCK
    if nh == 0 or nw == 0:
        raise ValueError(f"image {h}x{w} is smaller than one {BLOCK}-px NIQE block")
    img = img[..., : nh * BLOCK, : nw * BLOCK]
    # sharpness: mean local std (7x7 window) per block at the first scale
    mu = F.avg_pool2d(F.pad(img, (3, 3, 3, 3), mode="replicate"), 7, stride=1)
    var = F.avg_pool2d(F.pad(img * img, (3, 3, 3, 3), mode="replicate"), 7, stride=1) - mu * mu
    sharp = F.avg_pool2d(var.clamp_min(0).sqrt(), BLOCK).reshape(-1)
    feats = []
    for scale in (1, 2):
        norm = normalize_img_with_gauss(img, padding="replicate")
        feats.append(blockproc(norm, [BLOCK // scale, BLOCK // scale], fun=compute_feature))
        if scale == 1:
            img = imresize(img / 255.0, scale=0.5, antialiasing=True) * 255.0
    f = torch.cat(feats, -1)[0]  # [n_blocks, 36]
    return f.numpy(), sharp.numpy()


def fit_pristine(images: Iterable[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [36] and covariance [36, 36] of the sharp blocks' features over `images`."""
    selected = []
    for rgb in images:
        f, s = block_features(rgb)
        keep = s > SHARPNESS_FRACTION * s.max()
        selected.append(f[keep & np.isfinite(f).all(axis=1)])
    feats = np.concatenate(selected)
    if len(feats) < 40:
        raise ValueError(f"only {len(feats)} pristine blocks: too few to fit a 36-d Gaussian")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def write_builtin(path: Path = BUILTIN_PRISTINE) -> Path:
    from scipy.io import savemat

    images = [np.asarray(c.image.convert("RGB")) for c in builtin_candidates() if c.image is not None]
    mu, cov = fit_pristine(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"mu_prisparam": mu[None], "cov_prisparam": cov,
                        "about": f"NIQE pristine MVG fitted on {len(images)} built-in photographs (rewards/niqe.py)"})
    return path


if __name__ == "__main__":
    out = write_builtin(Path(sys.argv[1]) if len(sys.argv) > 1 else BUILTIN_PRISTINE)
    print(f"wrote {out}")
