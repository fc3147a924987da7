"""How the default degradation synthesis and label thresholds split each slot's words.

Prints the word split per slot and the percentiles of each measured strength, so the
thresholds in `LabelThresholds` can be re-tuned when the synthesis ranges change. Draws at
the configured HR and LR sizes (`image.hr_size`, `image.lr_size`; `--config` for a YAML);
with `degradation.thresholds.measure=lr` the LR strengths (lr_*_rms) are printed too.

    .venv/bin/python bench/label_balance.py [--draws 300] [--config configs/tiny-cpu.yaml] [key=value overrides]
"""

import argparse
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import astronaut  # noqa: E402
from cluster.config import load_config  # noqa: E402
from vlcot.degradation import degrade, label_degradation  # noqa: E402
from vlcot.trace import SLOTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--config", default=None, help="a YAML config; default: the dataclass (paper-scale) defaults")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=args.overrides, default=False)
    hr = np.asarray(astronaut(cfg.image.hr_size))
    lr_size = (cfg.image.lr_size, cfg.image.lr_size)
    words = [Counter() for _ in SLOTS]
    strengths = {}
    for seed in range(args.draws):
        _, p = degrade(hr, lr_size, cfg.degradation, seed)
        for i, w in enumerate(label_degradation(p, cfg.degradation.thresholds)):
            words[i][w] += 1
        for k, v in p["strength"].items():
            strengths.setdefault(k, []).append(v)
    for slot, c in zip(SLOTS, words):
        total = sum(c.values())
        print(f"{slot:13s} " + "  ".join(f"{w} {100 * n / total:.0f}%" for w, n in sorted(c.items())))
    for k, v in strengths.items():
        pct = np.percentile(v, [10, 25, 50, 75, 90])
        print(f"{k:17s} p10/25/50/75/90: " + " / ".join(f"{x:.2f}" for x in pct))


if __name__ == "__main__":
    main()
