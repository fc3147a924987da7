"""Throughput of the offline generation reward (PIQE + fitted NIQE) on this CPU, for 64 px
and 512 px final images, in the IQA environment, against a plain PIL decode of the same
image (PNG bytes -> RGB array) timed in the same run.

    .venv-iqa/bin/python bench/generation_reward.py      # needs pyiqa: the IQA environment
"""

import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import astronaut, best_time  # noqa: E402
from rewards.config import GenerationConfig  # noqa: E402
from rewards.iqa import IQAScorer  # noqa: E402


def main() -> None:
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    scorer = IQAScorer(GenerationConfig(preset="offline"))
    for size, batch in ((64, 16), (512, 4)):
        img = np.asarray(astronaut(size))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        data = buf.getvalue()
        decode = best_time(lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        images = [img] * batch
        scorer.score(images[:1])
        t0 = time.perf_counter()
        rounds = 3
        for _ in range(rounds):
            scorer.score(images)
        per = (time.perf_counter() - t0) / (rounds * batch)
        print(f"offline generation reward, {size}x{size} final image (batch {batch}): {per * 1e3:.1f} ms/sample = "
              f"{1 / per:.1f} samples/s; PIL PNG decode of the same image {decode * 1e3:.3f} ms; ratio {per / decode:.0f}x")


if __name__ == "__main__":
    main()
