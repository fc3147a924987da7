"""Rollout throughput with 1 vs 2 rollout workers (vLLM engine), same prompts, same run.

On a 2-core machine two workers compete for the same cores, so expect ~1x here; on a GPU
cluster each worker has its own GPU and the ratio approaches the worker count.

    .venv/bin/python bench/rollout_scaling.py [--prompts 8] [key=value ...]
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from training.jobs import ensure_policy_dir  # noqa: E402
from cluster.rollout_pool import RolloutPool  # noqa: E402
from vlcot.policy import load_policy_meta  # noqa: E402
from vlcot.trace import build_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(overrides=["run_dir=runs/bench-rollout", *args.overrides])
    pdir = str(ensure_policy_dir(cfg))
    meta = load_policy_meta(pdir)
    layout = meta.layout
    side = cfg.image.prompt_size // 8
    prompts = [build_prompt(np.random.default_rng(i).integers(0, layout.codebook_size, (side, side)),
                            meta.codec, layout) for i in range(args.prompts)]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rates = {}
    for n in (1, 2):
        pool = RolloutPool(dataclasses.replace(cfg.rollout, num_workers=n), pdir, cfg.image)
        pool.collect(pool.submit(prompts[:n], 0))  # warm-up every worker
        t0 = time.perf_counter()
        res = pool.collect(pool.submit(prompts, 1))
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for r in res for s in r)
        rates[n] = tokens / dt
        print(f"{n} worker(s): {tokens} tokens in {dt:.1f}s = {rates[n]:.0f} tokens/s")
        pool.shutdown()
    print(f"2 / 1 workers throughput ratio: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} CPU cores")
    ray.shutdown()


if __name__ == "__main__":
    main()
