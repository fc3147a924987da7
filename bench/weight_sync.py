"""Weight-sync throughput through the learner -> rollout transport (gloo on CPU, NCCL on
GPU), against a plain tensor copy of the same bytes in the same run.

Sender and receiver are separate processes, as learner rank 0 and a rollout worker are.

    .venv/bin/python bench/weight_sync.py [--mb 64 512] [--bucket-mb 256] [--backend gloo]
"""

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comm.transport import WeightTransport, free_port  # noqa: E402


def tensors_of(total_mb: int, n: int = 48):
    per = total_mb * (1 << 20) // 4 // n
    return {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(n)}


def receiver(port: int, backend: str, rounds: int, q) -> None:
    t = WeightTransport("127.0.0.1", port, 1, 2, backend=backend)
    for _ in range(rounds):
        version, it = t.receive()
        n = sum(x.numel() for _, x in it)
    q.put(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    for mb in args.mb:
        ts = tensors_of(mb)
        if args.backend == "nccl":
            ts = {k: v.cuda() for k, v in ts.items()}
        nbytes = sum(v.numel() * 4 for v in ts.values())
        metas = [(k, tuple(v.shape), "float32") for k, v in ts.items()]
        port = free_port()
        q = ctx.Queue()
        p = ctx.Process(target=receiver, args=(port, args.backend, args.rounds + 1, q))
        p.start()
        t = WeightTransport("127.0.0.1", port, 0, 2, backend=args.backend)
        t.send(metas, iter(ts.values()), 0, args.bucket_mb << 20)  # warm-up
        best = float("inf")
        for r in range(args.rounds):
            stats = t.send(metas, iter(ts.values()), r + 1, args.bucket_mb << 20)
            best = min(best, stats.seconds)
        p.join()
        dst = {k: torch.empty_like(v) for k, v in ts.items()}
        copy = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for k, v in ts.items():
                dst[k].copy_(v)
            if args.backend == "nccl":
                torch.cuda.synchronize()
            copy = min(copy, time.perf_counter() - t0)
        print(f"{args.backend} broadcast of {nbytes / 1e6:.0f} MB ({len(ts)} tensors, buckets of {args.bucket_mb} MB): "
              f"{best:.3f}s = {nbytes / 1e9 / best:.2f} GB/s; plain copy {copy:.3f}s = {nbytes / 1e9 / copy:.2f} GB/s; "
              f"ratio {best / copy:.1f}x slower than a copy")


if __name__ == "__main__":
    main()
