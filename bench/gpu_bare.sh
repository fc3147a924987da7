#!/usr/bin/env bash
# Every check a bare GPU machine can run, as one command for a session lent one (its image has
# torch and transformers but no vllm, ray, deepspeed or network: docs/gpu.md). At most 7.5 minutes
# on one H100/H200 (so a 15-minute device budget leaves room for the start); each script is cut
# off by its own limit so the other still runs, and the decode stage stops after DECODE_S.
#   1. bench/gpu_shared_prompt.py: separate vs shared-prompt learner passes at the 7B shape, G 5 and 8
#   2. bench/gpu_smoke.py: 7B decode with CFG, learner memory, VQ (the vq stage needs diffusers:
#      carry runs/gpu-wheels, docs/gpu.md, and it is installed beside the image's packages)
# Results: $OUT/gpu_shared_prompt.json, $OUT/gpu_smoke.json and this output in $OUT/gpu_bare.txt.
#   bash bench/gpu_bare.sh                 # on the GPU machine
#   PYTHON=.venv/bin/python bash bench/gpu_bare.sh --cpu    # the same at the tiny shapes on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
export OUT
PYTHON=${PYTHON:-python3}
SHARED_S=${SHARED_S:-200}
SMOKE_S=${SMOKE_S:-240}
DECODE_S=${DECODE_S:-120}
status=0
{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  if compgen -G "runs/gpu-wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/gpu-bare-site runs/gpu-wheels/*.whl \
      && export PYTHONPATH=/tmp/gpu-bare-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  echo "== bench/gpu_shared_prompt.py (limit ${SHARED_S} s)"
  timeout "$SHARED_S" "$PYTHON" -u bench/gpu_shared_prompt.py "$@" || { rc=$?; echo "gpu_shared_prompt exit $rc"; status=1; }
  echo "== bench/gpu_smoke.py (limit ${SMOKE_S} s)"
  timeout "$SMOKE_S" "$PYTHON" -u bench/gpu_smoke.py --decode-budget-s "$DECODE_S" "$@" || { rc=$?; echo "gpu_smoke exit $rc"; status=1; }
  date -u
  exit "$status"
} 2>&1 | tee "$OUT/gpu_bare.txt"
exit "${PIPESTATUS[0]}"
