#!/usr/bin/env bash
# GPU check for a session lent a GPU machine (budget: under 8 minutes on one H100/H200).
# 1. install the GPU environment (one venv: vllm + pyiqa)  2. one ZeRO-3 bf16 GRPO step with
# the tiny policy on 1 GPU rank  3. NCCL weight broadcast throughput vs a device copy.
# Everything it prints goes to $OUT/gpu_learner.txt too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
REALSR_DEVICE=gpu bash scripts/install.sh
{
  nvidia-smi -L
  .venv/bin/python - <<'PY'
import time, numpy as np, ray
from cluster.config import load_config
from training.jobs import ensure_policy_dir
from learner.batch import pack_grpo
from learner.config import LearnerConfig
from cluster.learner_group import LearnerGroup
cfg = load_config(overrides=["run_dir=/tmp/gpu-learner"])
pdir = ensure_policy_dir(cfg)
ray.init(address="local", include_dashboard=False, log_to_driver=False)
lc = LearnerConfig(num_workers=1, num_gpus=1, zero_stage=3, lr=1e-4, micro_batch_size=4)
t = time.time(); g = LearnerGroup(lc, str(pdir)); print("setup", round(time.time() - t, 1), g.setup_reports)
rng = np.random.default_rng(0)
prompts = [list(rng.integers(3, 600, 300)) for _ in range(8)]
resp = [list(rng.integers(3, 17000, 600)) for _ in range(8)]
b = pack_grpo(prompts, resp, rng.normal(size=8), [list(-rng.uniform(8, 11, 600)) for _ in range(8)])
for i in range(3):
    m = g.grpo_step(b); print("ZeRO-3 bf16 GRPO step", i, {k: round(v, 4) for k, v in m.items()})
PY
  .venv/bin/python bench/weight_sync.py --backend nccl --mb 512 2048 || echo "NCCL bench needs 2 GPUs visible to one machine? see output"
} 2>&1 | tee "$OUT/gpu_learner.txt"
