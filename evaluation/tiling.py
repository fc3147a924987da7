"""Cutting an LR image into model-sized tiles and blending the tiles' outputs back.

Pure numpy. Positions are in LR pixels; an output stage with `factor` output pixels per LR
pixel is blended with a linear feather across each overlap, so seams fade instead of
showing as lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np


def axis_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Tile origins along one axis of `length` (>= tile): the fewest tiles that share at
    least `overlap` pixels with their neighbour, spread evenly (equal overlaps)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / max(1, tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass
class TilePlan:
    width: int  # the LR image (before padding)
    height: int
    tile: int
    overlap: int

    @property
    def padded(self) -> Tuple[int, int]:
        return max(self.width, self.tile), max(self.height, self.tile)

    def boxes(self) -> List[Tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) in padded-LR pixels, row-major."""
        pw, ph = self.padded
        return [(x, y, x + self.tile, y + self.tile)
                for y in axis_starts(ph, self.tile, self.overlap) for x in axis_starts(pw, self.tile, self.overlap)]

    def pad(self, lr: np.ndarray) -> np.ndarray:
        """[H, W, 3] -> edge-padded to at least one tile each way."""
        pw, ph = self.padded
        return np.pad(lr, ((0, ph - lr.shape[0]), (0, pw - lr.shape[1]), (0, 0)), mode="edge")


def count_tiles(width: int, height: int, tile: int, overlap: int) -> int:
    return len(TilePlan(width, height, tile, overlap).boxes())


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1-D weights: rising over the first `overlap` samples, falling over the last."""
    w = np.ones(n, dtype=np.float64)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
        w[:overlap] = np.minimum(w[:overlap], r)
        w[-overlap:] = np.minimum(w[-overlap:], r[::-1])
    return w


def blend(plan: TilePlan, outputs: List[np.ndarray], factor: float) -> np.ndarray:
    """Tile outputs ([t*factor, t*factor, 3] uint8, in `boxes()` order) -> the [H*factor,
    W*factor, 3] uint8 image, the padding cropped away."""
    pw, ph = plan.padded
    size = int(round(plan.tile * factor))
    acc = np.zeros((int(round(ph * factor)), int(round(pw * factor)), 3), dtype=np.float64)
    wsum = np.zeros(acc.shape[:2], dtype=np.float64)
    ov = int(round(plan.overlap * factor))
    w1 = _ramp(size, min(ov, size // 2))
    weight = np.outer(w1, w1)
    for (x0, y0, _, _), out in zip(plan.boxes(), outputs):
        if out.shape[:2] != (size, size):
            raise ValueError(f"tile output is {out.shape[:2]}, expected {(size, size)}")
        ox, oy = int(round(x0 * factor)), int(round(y0 * factor))
        acc[oy:oy + size, ox:ox + size] += out.astype(np.float64) * weight[..., None]
        wsum[oy:oy + size, ox:ox + size] += weight
    img = acc / np.maximum(wsum, 1e-12)[..., None]
    h, w = int(round(plan.height * factor)), int(round(plan.width * factor))
    return img[:h, :w].round().clip(0, 255).astype(np.uint8)
