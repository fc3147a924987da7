"""How many cold-start SFT steps the tiny config needs until >= 90% of greedy generations
pass the published strict format check, and how long that takes on this machine.

Trains on the built-in set (11 traces) with the real learner group (2 ZeRO-2 CPU ranks),
and every `--eval-every` steps greedily generates one response per prompt with HF
transformers (no decoding constraints: the policy alone must write the structure).

    .venv/bin/python bench/sft_format.py [--max-steps 600] [--eval-every 50] [key=value ...]
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from cluster.jobs import ensure_data, ensure_policy_dir, ensure_vq_dir, start_ray  # noqa: E402
from cluster.learner_group import LearnerGroup  # noqa: E402
from learner.sft import build_sft_examples, run_sft  # noqa: E402
from vlcot.data import read_manifest  # noqa: E402
from vlcot.policy import load_policy  # noqa: E402
from vlcot.trace import parse_response  # noqa: E402
from vlcot.vq import VQTokenizer  # noqa: E402


@torch.no_grad()
def strict_rate(policy, state, prompts, responses, hr_size):
    policy.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    ok, valid = 0, 0
    for p, r in zip(prompts, responses):
        out = policy.model.generate(torch.tensor([p]), max_new_tokens=len(r) + 32, do_sample=False,
                                    eos_token_id=policy.codec.end_token_id, pad_token_id=policy.tokenizer.pad_token_id)
        parsed = parse_response(out[0, len(p):].tolist(), policy.codec, policy.layout, hr_size=hr_size)
        ok += parsed.strict_format
        valid += parsed.valid
    return ok / len(prompts), valid / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(overrides=["run_dir=runs/bench-sft", "data.output_dir=runs/bench-sft/data", *args.overrides])
    torch.set_num_threads(1)
    policy = load_policy(ensure_policy_dir(cfg), cfg.policy, cfg.image, cfg.vq)
    vq = VQTokenizer.load(ensure_vq_dir(cfg))
    prompts, responses, _ = build_sft_examples(read_manifest(ensure_data(cfg)), vq, policy.codec, policy.layout, cfg.image)
    print(f"{len(prompts)} traces, response length {np.mean([len(r) for r in responses]):.0f} tokens; "
          f"lr {cfg.learner.sft.lr}, batch {cfg.learner.sft.batch_size}, {cfg.learner.num_workers} ZeRO-{cfg.learner.zero_stage} ranks")
    start_ray(max(2, cfg.learner.num_workers))
    group = LearnerGroup(cfg.learner, str(ensure_policy_dir(cfg)))
    sft_cfg = cfg.learner.sft
    sft_cfg.steps = args.eval_every
    train_s, t_start, steps = 0.0, time.perf_counter(), 0
    try:
        while steps < args.max_steps:
            t0 = time.perf_counter()
            hist = run_sft(group, prompts, responses, sft_cfg, policy.tokenizer.pad_token_id or 0,
                           policy.layout.image_span_ids(), seed=cfg.seed + steps)
            train_s += time.perf_counter() - t0
            steps += args.eval_every
            rate, valid = strict_rate(policy, group.full_state_dict(), prompts, responses, cfg.image.hr_size)
            print(f"step {steps}: sft loss {hist[-1]['loss/sft']:.3f}, strict format {rate:.0%}, all stages valid "
                  f"{valid:.0%}, SFT time {train_s:.0f}s, wall {time.perf_counter() - t_start:.0f}s", flush=True)
            if rate >= 0.9:
                print(f"RESULT: >= 90% strict format after {steps} SFT steps; {train_s:.0f}s of SFT "
                      f"({train_s / steps:.2f} s/step), {time.perf_counter() - t_start:.0f}s wall with evaluation")
                return
        print(f"RESULT: strict format below 90% after {steps} steps")
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
