"""Rollout tokens/s: the vLLM engine vs the HF engine on the tiny policy, same prompts, same
machine, same run (each in its own Ray worker, one after the other, after a warm-up call).

    .venv/bin/python bench/rollout_throughput.py [--prompts 4] [--group 4] [key=value ...]
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
from rollout.worker import RolloutWorker  # noqa: E402
from vlcot.policy import load_policy_meta  # noqa: E402
from vlcot.trace import build_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(overrides=["run_dir=runs/bench-rollout", *args.overrides])
    pdir = str(ensure_policy_dir(cfg))
    meta = load_policy_meta(pdir)
    layout, codec = meta.layout, meta.codec
    side = cfg.image.prompt_size // 8
    prompts = [build_prompt(np.random.default_rng(i).integers(0, layout.codebook_size, (side, side)), codec, layout)
               for i in range(args.prompts)]
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=1 if args.gpu else 0, include_dashboard=False,
             log_to_driver=False)
    rates = {}
    for engine in ("vllm", "hf"):
        rc = dataclasses.replace(cfg.rollout, engine=engine, group_size=args.group,
                                 gpus_per_worker=1 if args.gpu else 0, cpus_per_worker=os.cpu_count())
        w = RolloutWorker.options(num_cpus=1, num_gpus=rc.gpus_per_worker).remote(rc, pdir, cfg.image)
        ray.get(w.ready.remote())
        ray.get(w.generate.remote(prompts[:1], 1, 0))  # warm-up
        t0 = time.perf_counter()
        res = ray.get(w.generate.remote(prompts, args.group, 1))
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for r in res for s in r)
        rates[engine] = tokens / dt
        print(f"{engine:4s}: {tokens} tokens ({args.prompts} prompts x {args.group} samples) in {dt:.1f}s = "
              f"{rates[engine]:.0f} tokens/s")
        ray.kill(w)
    print(f"vLLM / HF throughput ratio: {rates['vllm'] / rates['hf']:.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
