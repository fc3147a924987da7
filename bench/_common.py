"""Shared helpers for the benchmarks: the reference timing every bench prints beside its own."""

from __future__ import annotations

import time
from typing import Callable

import skimage.data
from PIL import Image


def astronaut(size: int = 512) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.LANCZOS)


def best_time(fn: Callable[[], object], repeat: int = 5, min_time: float = 0.2) -> float:
    """Best per-call seconds over `repeat` rounds, each round long enough to time."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def pil_bicubic_time(src: int = 512, dst: int = 128) -> float:
    """The machine's single-image PIL bicubic resize time: every bench's reference unit."""
    img = astronaut(src)
    return best_time(lambda: img.resize((dst, dst), Image.BICUBIC))


def report(name: str, seconds: float, ref: float, ref_name: str) -> None:
    print(f"{name}: {seconds * 1e3:.2f} ms/image = {1.0 / seconds:.1f} images/s; "
          f"ratio to {ref_name} ({ref * 1e3:.3f} ms): {seconds / ref:.0f}x")
