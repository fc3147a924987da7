"""Whether a node's torch can use its GPUs: torch's CUDA build against the NVIDIA driver.
The verdict is a pure function tested with hand-given versions; `realsr-r1 check-env` and
`python -m cluster.interpreters --gpu` (what scripts/install.sh runs on GPU machines) report it."""

import json
import subprocess
import sys

import pytest
import torch

from app.cli import main as cli_main
from cluster.config import REPO_ROOT
from cluster.interpreters import cuda_verdict

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
TOO_OLD = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12080)."


def test_a_cuda_13_wheel_on_an_r570_driver_is_refused_with_the_build_that_would_fit():
    ok, line = cuda_verdict("2.14.0+cu130", "13.0", "570.86.15", False, 0, TOO_OLD)
    assert not ok
    assert line.startswith("driver 570.86.15 is too old for torch 2.14.0+cu130 (CUDA 13.0 build): "
                           "CUDA 13.x needs driver >= 580")
    assert "cu128" in line and "CUDA 12.8 needs >= 570.26" in line  # the newest build this driver runs


def test_a_driver_below_every_build_of_the_table_says_so():
    ok, line = cuda_verdict("2.6.0+cu126", "12.6", "470.82.01", False, 0)
    assert not ok and "CUDA 12.x needs driver >= 525.60.13" in line and "an older CUDA" in line


def test_a_matching_driver_with_gpus_is_ok():
    ok, line = cuda_verdict("2.14.0+cu130", "13.0", "580.95.05", True, 8)
    assert ok and line == "OK: torch 2.14.0+cu130 (CUDA 13.0 build), driver 580.95.05, 8 GPU(s)"


def test_a_cuda_12_build_on_an_older_12_driver_runs_under_minor_version_compatibility():
    ok, line = cuda_verdict("2.6.0+cu124", "12.4", "535.104.05", True, 1)
    assert ok and "minor-version compatibility" in line and ">= 550.54.14 is recommended" in line


def test_no_driver_or_a_cpu_build_or_no_devices_are_refused():
    ok, line = cuda_verdict("2.14.0+cu130", "13.0", None, False, 0)
    assert not ok and line.startswith("no NVIDIA driver") and "needs driver >= 580" in line
    ok, line = cuda_verdict("2.13.0+cpu", None, "580.95.05", False, 0)
    assert not ok and "CPU-only build" in line
    ok, line = cuda_verdict("2.14.0+cu130", "13.0", "580.95.05", False, 0, "no CUDA-capable\ndevice is detected")
    assert not ok and line.endswith("sees no GPU: no CUDA-capable device is detected")


def test_check_env_reports_torchs_cuda_build_and_the_driver(capsys):
    assert cli_main(["check-env"]) == 0  # the tiny CPU config has no GPU roles
    cuda = json.loads(capsys.readouterr().out)["cuda"]
    assert cuda["torch"] == torch.__version__ and cuda["torch_cuda"] == torch.version.cuda
    assert set(cuda) >= {"driver", "device_count", "verdict", "ok"} and cuda["gpu_expected"] is False


@needs_no_gpu
def test_check_env_fails_when_the_configs_gpu_roles_could_not_run_here(capsys):
    assert cli_main(["check-env", "learner.num_gpus=1"]) == 1
    captured = capsys.readouterr()
    cuda = json.loads(captured.out)["cuda"]
    assert cuda["ok"] is False and cuda["gpu_expected"] is True
    assert cuda["verdict"] in captured.err


@needs_no_gpu
def test_the_install_scripts_gpu_check_exits_1_on_this_cpu_machine():
    out = subprocess.run([sys.executable, "-m", "cluster.interpreters", "--gpu"], capture_output=True, text=True,
                         timeout=300, cwd=str(REPO_ROOT))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[check] FAILED: " in out.stderr and json.loads(out.stdout)["ok"] is False
    assert "python -m cluster.interpreters --gpu" in (REPO_ROOT / "scripts" / "install.sh").read_text()
