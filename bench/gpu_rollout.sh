#!/usr/bin/env bash
# GPU check for a session lent a GPU machine (under 8 minutes on one H100/H200):
# installs the one-environment GPU stack, then times the vLLM (bf16, CUDA) and HF engines on
# the tiny policy and on paper-size images (HR 512: 4,164-token final spans).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
REALSR_DEVICE=gpu bash scripts/install.sh
{
  nvidia-smi -L
  .venv/bin/python bench/rollout_throughput.py --gpu --prompts 8 --group 5
  .venv/bin/python bench/rollout_throughput.py --gpu --prompts 2 --group 5 run_dir=runs/bench-rollout-512 \
      image.hr_size=512 image.prompt_size=512 image.lr_size=128 policy.model.max_position_embeddings=16384 \
      rollout.max_model_len=12288
} 2>&1 | tee "$OUT/gpu_rollout.txt"
