"""Classifier-free guidance on the fast path: tokens/s of the vLLM engine with CFG against the
HF engine with CFG (the goal: >= 3x), and against vLLM without CFG (the cost of the twins),
on the same prompts in the same run. Each engine runs in its own Ray worker, one after the
other, after a warm-up call.

The prompts continue a trace at its final image (the spans CFG guides), so nearly every
generated token is an image code or a span token; `--from-start` times whole responses
instead (the random tiny policy rarely opens an image there).

    .venv/bin/python bench/cfg_decoding.py [--prompts 4] [--group 4] [--scale 0.8] [--gpu] [key=value ...]
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
from rollout.rules import SpanRules  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402
from vlcot.policy import load_policy_meta  # noqa: E402
from vlcot.trace import Trace, build_prompt, serialise_response  # noqa: E402


def final_image_prompts(cfg, meta, count: int, from_start: bool):
    layout, codec = meta.layout, meta.codec
    rules = SpanRules.build(layout, cfg.image, cfg.rollout.sampling, meta.config.vocab_size)
    side = cfg.image.prompt_size // layout.downsample
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        prompt = build_prompt(rng.integers(0, layout.codebook_size, (side, side)), codec, layout)
        if not from_start:
            grids = [(h * rules.codes_per_patch, w * rules.codes_per_patch) for h, w in rules.stage_grids]
            trace = Trace(degradation=["medium", "downsample", "heavy", "light", "upsample"], rough_understand="A photograph.", middle_understand="Details.",
                          final_understand="Fine details.", rough_image=rng.integers(0, layout.codebook_size, grids[0]),
                          middle_image=rng.integers(0, layout.codebook_size, grids[1]),
                          final_image=rng.integers(0, layout.codebook_size, grids[2]))
            response = serialise_response(trace, codec, layout)
            starts = [k for k, t in enumerate(response) if t == layout.image_start]
            prompt = prompt + response[: starts[-1] + 1]
        out.append(prompt)
    return out


def time_engine(cfg, pdir, prompts, engine: str, scale: float, group: int, gpu: bool):
    sampling = dataclasses.replace(cfg.rollout.sampling, cfg_scale=scale)
    rc = dataclasses.replace(cfg.rollout, engine=engine, group_size=group, sampling=sampling,
                             gpus_per_worker=1 if gpu else 0, cpus_per_worker=os.cpu_count())
    w = RolloutWorker.options(num_cpus=1, num_gpus=rc.gpus_per_worker).remote(rc, pdir, cfg.image)
    try:
        ray.get(w.ready.remote())
        ray.get(w.generate.remote(prompts[:1], 1, 0))  # warm-up
        t0 = time.perf_counter()
        res = ray.get(w.generate.remote(prompts, group, 1))
        dt = time.perf_counter() - t0
        stats = ray.get(w.throughput.remote())
    finally:
        ray.kill(w)
    tokens = sum(len(s.token_ids) for r in res for s in r)
    rate = tokens / dt
    print(f"{engine:4s} cfg_scale {scale:g}: {tokens} tokens ({len(prompts)} prompts x {group} samples) in {dt:.1f}s "
          f"= {rate:.0f} tokens/s; unconditional branches {stats['cfg_twins']:.0f}, "
          f"codes drawn without one {stats['cfg_unguided_codes']:.0f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--scale", type=float, default=0.8)
    ap.add_argument("--from-start", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(overrides=["run_dir=runs/bench-cfg", *args.overrides])
    pdir = str(ensure_policy_dir(cfg))
    prompts = final_image_prompts(cfg, load_policy_meta(pdir), args.prompts, args.from_start)
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=1 if args.gpu else 0, include_dashboard=False,
             log_to_driver=False)
    try:
        vllm_cfg = time_engine(cfg, pdir, prompts, "vllm", args.scale, args.group, args.gpu)
        hf_cfg = time_engine(cfg, pdir, prompts, "hf", args.scale, args.group, args.gpu)
        vllm_plain = time_engine(cfg, pdir, prompts, "vllm", 1.0, args.group, args.gpu)
    finally:
        ray.shutdown()
    print(f"with CFG, vLLM / HF throughput: {vllm_cfg / hf_cfg:.2f}x (goal >= 3x)")
    print(f"vLLM with CFG / without: {vllm_cfg / vllm_plain:.2f}x (the cost of the unconditional twins)")


if __name__ == "__main__":
    main()
