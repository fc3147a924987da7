"""Degradation throughput, 512 -> 128 (the paper's sizes), on this CPU.

Reference measured in the same run: one PIL bicubic resize of the same 512 px image to 128.

    .venv/bin/python bench/degradation_throughput.py [--images 40]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import astronaut, pil_bicubic_time, report  # noqa: E402
from vlcot.config import DegradationConfig  # noqa: E402
from vlcot.degradation import degrade  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args()
    hr = np.asarray(astronaut(512))
    cfg = DegradationConfig()
    degrade(hr, (128, 128), cfg, seed=0)  # warm-up
    t0 = time.perf_counter()
    for seed in range(args.images):
        degrade(hr, (128, 128), cfg, seed=seed)
    per = (time.perf_counter() - t0) / args.images
    ref = pil_bicubic_time(512, 128)
    print(f"torch threads: {__import__('torch').get_num_threads()}, images: {args.images} (seeds 0..{args.images - 1})")
    report("degrade 512->128 (second order, default config)", per, ref, "PIL bicubic 512->128")


if __name__ == "__main__":
    main()
