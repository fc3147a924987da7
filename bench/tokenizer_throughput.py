"""VQ tokenizer encode/decode throughput on this CPU, tiny config (128 px) and the paper's
VQ_8 architecture at 512 px (random weights: speed does not depend on the values).

Reference measured in the same run: one PIL bicubic resize of the same image (to 1/4 side).

    .venv/bin/python bench/tokenizer_throughput.py [--skip-paper]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import astronaut, best_time, pil_bicubic_time, report  # noqa: E402
from cluster.config import load_config  # noqa: E402
from vlcot.config import VQConfig  # noqa: E402
from vlcot.vq import VQTokenizer, pil_to_tensor  # noqa: E402


def bench(name: str, cfg: VQConfig, size: int, batch: int, repeat: int, min_time: float) -> None:
    vq = VQTokenizer(cfg)
    x = pil_to_tensor(astronaut(size))[None].repeat(batch, 1, 1, 1)
    codes = vq.encode(x)
    enc = best_time(lambda: vq.encode(x), repeat=repeat, min_time=min_time) / batch
    dec = best_time(lambda: vq.decode(codes), repeat=repeat, min_time=min_time) / batch
    ref = pil_bicubic_time(size, size // 4)
    params = sum(p.numel() for p in vq.parameters())
    print(f"{name}: {params / 1e6:.1f}M params, {size} px -> {tuple(codes.shape[1:])} codes, batch {batch}")
    report(f"  encode {size}px", enc, ref, f"PIL bicubic {size}->{size // 4}")
    report(f"  decode {size}px", dec, ref, f"PIL bicubic {size}->{size // 4}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-paper", action="store_true", help="only the tiny config")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    bench("tiny-cpu VQ", load_config().vq, 128, batch=8, repeat=3, min_time=0.5)
    if not args.skip_paper:
        bench("paper VQ_8 (LlamaGen ds8)", VQConfig(), 512, batch=1, repeat=1, min_time=0.0)


if __name__ == "__main__":
    main()
