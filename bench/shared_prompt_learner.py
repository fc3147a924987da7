"""Learner time per GRPO step, separate passes vs the shared-prompt pass, in the same run.

Each mode gets its own learner group (Ray actors, DeepSpeed, the config's ranks and ZeRO stage)
and trains one GRPO step on the same batch: `--prompts` prompts of the config's shape (at paper
shape: the 512-px LR image's 64x64 codes in the conversation, ~4.2k tokens), each with G responses
of the paper's trace shape (text, then 16x16, 32x32 and 64x64 code images: ~5.6k tokens). A short
warm-up step first (DeepSpeed's first pass records ZeRO-3's parameter trace). Prints learner
tokens (what the policy's passes read) and learner seconds per step for each G, and the ratios.
`--repeats N` times N steps of each mode, alternating, and reports the medians: on this 2-core
machine the same step's time varies by up to ±30% between runs.

    python -u bench/shared_prompt_learner.py                                   # paper shape, G 5 8 16
    python -u bench/shared_prompt_learner.py --config '' --groups 8 --prompts 4 --trace demo   # the demo's shape
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER_SIDES = (16, 32, 64)  # codes per side of the three drawn images at 512 px
TEXT = ("the image shows mild gaussian blur with a little jpeg compression and some sensor noise in the dark areas; "
        "a tabby cat sits on a wooden bench in a sunny garden, green leaves behind it, fur with fine stripes")


def _policy(cfg, run_dir: Path) -> Path:
    from training.jobs import build_initial_policy

    out = Path(cfg.policy.checkpoint) if cfg.policy.checkpoint else run_dir / "policy_init"
    if not (out / "config.json").is_file():
        print(build_initial_policy(cfg, out), flush=True)
    return out


def grouped_batch(cfg, policy_dir: Path, prompts: int, g: int, sides, seed: int = 0) -> Dict[str, np.ndarray]:
    from learner.batch import pack_grpo
    from vlcot.policy import load_policy_meta
    from vlcot.trace import build_prompt

    meta = load_policy_meta(policy_dir, cfg.policy, cfg.image, cfg.vq)
    rng = np.random.default_rng(seed)
    codebook = meta.layout.codebook_size
    side = cfg.image.prompt_size // meta.layout.downsample
    text = meta.codec.encode_text(TEXT)
    ps, rs = [], []
    for _ in range(prompts):
        prompt = build_prompt(rng.integers(0, codebook, (side, side)), meta.codec, meta.layout)
        for _ in range(g):
            response = list(text)
            for s in sides:
                response += meta.layout.image_span(rng.integers(0, codebook, (s, s))) + list(text[:8])
            ps.append(prompt)
            rs.append(response)
    logps = [list(-rng.uniform(0.5, 3.0, len(r))) for r in rs]
    return pack_grpo(ps, rs, rng.normal(size=len(ps)), logps, image_token_ids=meta.layout.image_span_ids())


def learner_steps(cfg, policy_dir: Path, batch, warm, repeats: int) -> Dict[str, Dict[str, float]]:
    """Both modes' learner groups up at once, then `repeats` timed steps of each, alternating
    (off, on, off, on, ...) so a change in the machine's load falls on both; each mode's median
    step, with its steps' times."""
    import dataclasses

    from cluster.learner_group import LearnerGroup

    groups = {mode: LearnerGroup(dataclasses.replace(cfg.learner, shared_prompt=mode), str(policy_dir))
              for mode in ("off", "on")}
    try:
        for group in groups.values():
            group.grpo_step(warm)
        runs: Dict[str, List[Dict[str, float]]] = {mode: [] for mode in groups}
        for _ in range(repeats):
            for mode, group in groups.items():
                runs[mode].append(group.grpo_step(batch))
        out = {}
        for mode, steps in runs.items():
            times = sorted(m["timing/learn_s"] for m in steps)
            out[mode] = {**steps[0], "timing/learn_s": float(np.median(times)), "times": times,
                         "on": groups[mode].shared_prompt}
        return out
    finally:
        for group in groups.values():
            group.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/paper-shape-cpu.yaml", help="'' = the embedded demo defaults")
    ap.add_argument("--groups", type=int, nargs="+", default=[5, 8, 16], help="G values")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (one per learner rank keeps groups whole)")
    ap.add_argument("--trace", choices=["paper", "demo"], default="paper",
                    help="response images: paper = 16/32/64 codes a side; demo = the config's HR/4, HR/2, HR sides")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per mode, alternating; the median is reported")
    ap.add_argument("--run-dir", default="",
                    help="default runs/bench-shared-prompt/<config name>: each config's policy has its own layout")
    ap.add_argument("overrides", nargs="*", help="config dotlist overrides")
    args = ap.parse_args()

    import ray

    from cluster.config import load_config

    run_dir = ROOT / (args.run_dir or f"runs/bench-shared-prompt/{Path(args.config).stem if args.config else 'demo'}")
    cfg = load_config(ROOT / args.config if args.config else None, [f"run_dir={run_dir}", *args.overrides])
    policy_dir = _policy(cfg, run_dir)
    hr_codes = cfg.image.hr_size // 8
    sides = PAPER_SIDES if args.trace == "paper" else (hr_codes // 4, hr_codes // 2, hr_codes)
    ray.init(num_cpus=max(4, int(cfg.learner.num_workers * cfg.learner.num_cpus)), include_dashboard=False,
             log_to_driver=False)
    ranks = cfg.learner.num_workers
    warm = grouped_batch(cfg, policy_dir, 1, 2 * ranks, (4,), seed=99)  # short: records ZeRO-3's trace
    print(f"learner: {ranks} ranks, ZeRO-{cfg.learner.zero_stage}, {cfg.learner.num_cpus:g} CPU each, "
          f"gradient checkpointing {cfg.learner.gradient_checkpointing}")
    rows: List[str] = []
    for g in args.groups:
        batch = grouped_batch(cfg, policy_dir, args.prompts, g, sides)
        prompt, trace = int(batch["prompt_len"][0]), int(batch["attention_mask"][0].sum())
        print(f"\nG {g}: {args.prompts} prompts x {g} = {len(batch['input_ids'])} samples; prompt {prompt:,} tokens, "
              f"trace {trace:,} tokens", flush=True)
        res = learner_steps(cfg, policy_dir, batch, warm, args.repeats)
        assert not res["off"]["on"] and res["on"]["on"], "shared_prompt on did not take effect"
        for mode, m in res.items():
            print(f"  shared_prompt {mode:3s}: learner tokens {m['tokens/learner_forward']:>9,.0f}  "
                  f"learn {m['timing/learn_s']:7.1f} s  loss {m['loss/policy']:+.6f}"
                  + (f"  (median of {', '.join(f'{t:.1f}' for t in m['times'])})" if len(m["times"]) > 1 else ""),
                  flush=True)
        speed = res["off"]["timing/learn_s"] / res["on"]["timing/learn_s"]
        fewer = res["off"]["tokens/learner_forward"] / res["on"]["tokens/learner_forward"]
        rows.append(f"G {g:2d}: tokens {fewer:.2f}x fewer, learner step {speed:.2f}x faster "
                    f"({res['off']['timing/learn_s']:.1f} s -> {res['on']['timing/learn_s']:.1f} s)")
        print("  " + rows[-1], flush=True)
    print("\nseparate passes / shared-prompt pass, same run:")
    print("\n".join(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
