"""`ray job submit` against a local `ray start --head`: the plain command and `realsr-r1 submit`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import REPO_ROOT
from comm.transport import free_port
from tests.ray_head import start_head, stop_head, wait_for_job_agent

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TRAIN_ARGS = ["trainer.steps=1", "trainer.prompts_per_step=2", "rollout.group_size=2", "trainer.sft=false",
              "rollout.sampling.text_budget=64", "data.heldout_per_image=0"]  # held-out check: tests/training/test_driver.py


@pytest.fixture(scope="module")
def head():
    """A head of this module's own, ended by its processes' ids (tests/ray_head.py): never
    `ray stop`, which would end every other Ray on the machine."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    port, dash = free_port(), free_port()
    # the job agent's ports too: its fixed defaults (52365 ...) are held by any other Ray on the machine, and a
    # head whose agent cannot bind takes no job ("No available agent to submit job")
    agent = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port())]
    temp_dir = start_head(BIN / "ray", ["--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host",
                                        "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "6",
                                        "--disable-usage-stats", *agent], env)
    address, client_env = f"http://127.0.0.1:{dash}", dict(env, RAY_AUTH_MODE="token")
    wait_for_job_agent(BIN / "ray", address, client_env)
    yield address, client_env
    stopped = stop_head(temp_dir)
    assert stopped and not any(Path(f"/proc/{pid}").exists() for pid in stopped), \
        "a process of the test's head outlived its clean-up"


def test_plain_ray_job_submit_runs_training(head, tmp_path):
    address, env = head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "realsr-r1", "train", "--no-progress", f"run_dir={tmp_path}", f"data.output_dir={tmp_path / 'data'}", *TRAIN_ARGS]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "train: 1 GRPO steps" in out.stdout
    assert (tmp_path / "train_summary.json").is_file()


def test_realsr_submit_builds_and_runs_the_job(head, tmp_path):
    address, env = head
    cmd = [str(BIN / "realsr-r1"), "submit", "--address", address, f"run_dir={tmp_path}",
           f"data.output_dir={tmp_path / 'data'}", *TRAIN_ARGS]
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and '"excludes"' in dry.stdout and ".venv" in dry.stdout
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr)
    assert (tmp_path / "train_summary.json").is_file()
