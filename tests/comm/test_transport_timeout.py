"""The weight group's collective timeout is `trainer.weight_sync_timeout_s`, for gloo and NCCL.

NCCL cannot be constructed without a GPU, so the NCCL half runs in the CUDA build of torch
that the IQA environment holds (torch 2.14.1+cu130 on the CPU machines): there the options
object the transport hands `ProcessGroupNCCL` is the real `ProcessGroupNCCL.Options` with the
configured timeout, and the real constructor accepts it (it gets as far as its own "no GPUs"
check instead of rejecting the argument). What this cannot show on a CPU: the watchdog honouring
it on a GPU. The gloo half runs a real group here and reads its timeout back.
"""

import subprocess
import sys
from datetime import timedelta

import pytest

from cluster.interpreters import IQA_VENV
from comm.transport import WeightTransport, free_port


def test_a_gloo_weight_group_gets_the_configured_timeout():
    t = WeightTransport("127.0.0.1", free_port(), 0, 1, "gloo", timeout_s=1234.0)
    try:
        assert t.pg.options._timeout == timedelta(seconds=1234)
    finally:
        t.close()


NCCL_PROBE = r"""
import sys
from datetime import timedelta
import torch, torch.distributed as dist
from comm.transport import WeightTransport, free_port, group_options
if not (torch.version.cuda and dist.is_nccl_available()):
    print("SKIP no CUDA build of torch with NCCL here"); sys.exit(0)
opts = group_options("nccl", timedelta(seconds=1800), "127.0.0.1")
assert type(opts) is dist.ProcessGroupNCCL.Options, type(opts)
assert opts._timeout == timedelta(seconds=1800), opts._timeout
try:
    WeightTransport("127.0.0.1", free_port(), 0, 1, "nccl", timeout_s=1800.0)
except ValueError as exc:  # the constructor took our options and then looked for a GPU
    assert "GPU" in str(exc), exc
    print("OK", opts._timeout, "|", exc)
else:
    print("OK built (a GPU is present)")
"""


def test_the_nccl_weight_group_is_built_with_the_configured_timeout_not_600s():
    py = IQA_VENV / "bin" / "python"
    if not py.is_file():
        pytest.skip("no second environment with a CUDA build of torch")
    out = subprocess.run([str(py), "-c", NCCL_PROBE], capture_output=True, text=True, timeout=300,
                         cwd=str(IQA_VENV.parent))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.startswith("OK"), out.stdout
