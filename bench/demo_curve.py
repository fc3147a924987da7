"""The embedded default main job's reward curve and wall time: runs `realsr-r1 train` on
configs/tiny-cpu.yaml (built-in data, cold-start SFT, GRPO) and prints the total reward of the
first vs the last 20% of GRPO steps and the run's verdict (last quarter vs first, in
standard errors; training/learning_curve.py) and the held-out rewards of the SFT and GRPO
policies (training/heldout_eval.py). Starts from an empty runs/bench-demo (or --run-dir).

    .venv/bin/python bench/demo_curve.py [--run-dir DIR] [key=value ...]   e.g. seed=1
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    overrides = sys.argv[1:]
    run_dir = ROOT / "runs" / "bench-demo"
    if overrides[:1] == ["--run-dir"]:
        run_dir, overrides = Path(overrides[1]).resolve(), overrides[2:]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its own data, tokenizer and SFT
    args = [sys.executable, "-m", "app.cli", "train", "--no-progress", f"run_dir={run_dir}",
            f"data.output_dir={run_dir / 'data'}", *overrides]
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    s = json.loads((run_dir / "train_summary.json").read_text())
    h = s["reward_history"]
    print("total reward per GRPO step:", " ".join(f"{x:.2f}" for x in h))
    print(f"first 20% mean {s['first_20pct_mean']:.3f} -> last 20% mean {s['last_20pct_mean']:.3f} "
          f"({s['last_20pct_mean'] - s['first_20pct_mean']:+.3f}); wall time {wall:.0f}s for the whole job")
    if s.get("learning"):
        print(s["learning"].get("line", s["learning"]), "; plot:", s["learning"].get("plot"))
    if s.get("heldout"):
        print((run_dir / "heldout.md").read_text())


if __name__ == "__main__":
    main()
