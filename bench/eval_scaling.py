"""`realsr-r1 eval` throughput with 1 vs 2 Ray actors per stage, same set, same run.

Generation workers run the policy over the LR images; metric workers (IQA environment) score
them. On this 2-core machine two actors share the cores, so expect well under 2x; on a
cluster each actor gets its own GPU/cores and the ratio approaches the actor count.

    .venv/bin/python bench/eval_scaling.py [--checkpoint RUN_OR_CKPT] [key=value ...]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from app.eval_job import run_eval_job  # noqa: E402
from app.eval_inputs import Column, builtin_set  # noqa: E402
from app.infer_job import resolve_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="default: the tiny random policy")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    cfg = load_config(overrides=["run_dir=runs/bench-eval", "eval.grid_images=0", *args.overrides])
    if args.checkpoint:
        ck = resolve_checkpoint(args.checkpoint)
    else:
        from vlcot.policy import build_tiny_policy
        from vlcot.vq import vq_from_config

        build_tiny_policy(cfg.policy, cfg.image, cfg.vq).save(tmp / "run" / "policy")
        vq_from_config(cfg.vq).save(tmp / "run" / "vq")
        ck = resolve_checkpoint(tmp / "run" / "policy")
    es = builtin_set(cfg)
    rates = {}
    for n in (1, 2):
        cfg.eval.num_workers = n
        cfg.eval.out_dir = str(tmp / f"eval{n}")
        s = run_eval_job(cfg, [es], [Column("policy", "checkpoint")], {"policy": ck}, progress=False)
        total = s["generate_s"] + s["metrics_s"]
        rates[n] = (len(es.items) / s["generate_s"], s["scored_pairs"] / s["metrics_s"], len(es.items) / total)
        print(f"{n} actor(s): generation {s['generate_s']:.1f}s ({rates[n][0]:.2f} images/s), metrics "
              f"{s['metrics_s']:.1f}s ({rates[n][1]:.2f} images/s), end to end {rates[n][2]:.2f} images/s "
              f"over {len(es.items)} images")
    print(f"ratio 2 vs 1 actors: generation {rates[2][0] / rates[1][0]:.2f}x, metrics {rates[2][1] / rates[1][1]:.2f}x, "
          f"end to end {rates[2][2] / rates[1][2]:.2f}x (os.cpu_count() = {os.cpu_count()})")


if __name__ == "__main__":
    main()
