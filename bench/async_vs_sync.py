"""Step time of one-step-off asynchronous vs synchronous GRPO on the same config, same run.

Cold-start SFT is off (it is the same in both modes); the first step of each run is not
counted (it includes warm-up). On this 2-core machine the overlap has few free cores to use.

    .venv/bin/python bench/async_vs_sync.py [--steps 5] [key=value ...]
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from training.driver import GRPOTrainer  # noqa: E402


def step_times(mode: str, steps: int, overrides) -> np.ndarray:
    times = []
    last = {}

    def clock(event, step, trainer):
        import time

        if event == "step_end":
            now = time.perf_counter()
            if "t" in last:
                times.append(now - last["t"])
            last["t"] = now

    run_dir = Path("runs") / f"bench-{mode}"
    cfg = load_config(overrides=[f"run_dir={run_dir}", f"data.output_dir={run_dir / 'data'}", f"trainer.mode={mode}",
                                 f"trainer.steps={steps}", "trainer.sft=false", "trainer.log_images_every=1000",
                                 "trainer.checkpoint_every=1000", *overrides])
    GRPOTrainer(cfg, progress=False, callbacks=[clock]).run()
    import ray

    ray.shutdown()
    return np.asarray(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sync = step_times("sync", args.steps, args.overrides)
    asyn = step_times("async", args.steps, args.overrides)
    print(f"sync : {sync.mean():.2f}s per step ({len(sync)} steps timed)")
    print(f"async: {asyn.mean():.2f}s per step ({len(asyn)} steps timed)")
    print(f"async / sync step time: {asyn.mean() / sync.mean():.2f}x (cores on this machine: {os.cpu_count()})")


if __name__ == "__main__":
    main()
