#!/usr/bin/env bash
# GPU check for a session lent a GPU machine (under 8 minutes on one H100/H200): the whole
# pipeline on CUDA with the tiny policy (learner bf16 + ZeRO-3 on the GPU, vLLM rollout on
# the GPU, rewards on CPU), 6 GRPO steps, sync then async; prints the per-step lines.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
REALSR_DEVICE=gpu bash scripts/install.sh
# One GPU shared by the learner rank and the rollout worker: NCCL refuses two members of the
# network weight group on one GPU, so weights go through the filesystem transport.
COMMON="run_dir=/tmp/gpu-train data.output_dir=/tmp/gpu-train/data learner.num_workers=1 learner.num_gpus=0.5
  learner.zero_stage=3 rollout.gpus_per_worker=0.4 rollout.gpu_memory_utilization=0.3 learner.sft.steps=150
  trainer.steps=6 trainer.prompts_per_step=4 rollout.group_size=4 trainer.weight_sync=filesystem"
{
  nvidia-smi -L
  .venv/bin/realsr-r1 train --no-progress $COMMON trainer.mode=sync
  .venv/bin/realsr-r1 train --no-progress $COMMON trainer.mode=async run_dir=/tmp/gpu-train-async trainer.sft=false
} 2>&1 | tee "$OUT/gpu_train.txt"
