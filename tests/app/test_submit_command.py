"""The `ray job submit` command `realsr-r1 submit` builds (no cluster needed)."""

import json
import sys

import pytest

from app.cli import main
from cluster.config import load_config
from app.submit import EXCLUDES, build_submit_command, job_runtime_env, run_submit

FAKE_RAY = """#!/bin/sh
# stands in for `ray job submit`: says the head has no job agent for its first $FAILS calls
n=$(cat "$STATE" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$STATE"
if [ "$FAILS" = other ]; then echo "ValueError: bad entrypoint" >&2; exit 3; fi
if [ $n -le $FAILS ]; then
  echo "Job submission server address: http://head:8265"
  echo "RuntimeError: Request failed with status code 500: No available agent to submit job, please try again later." >&2
  exit 1
fi
echo "Job 'raysubmit_1' submitted successfully"
"""


def parts(cmd):
    sep = cmd.index("--")
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    return cmd[:sep], cmd[sep + 1:], env


def test_the_entrypoint_runs_under_the_clusters_python_not_this_machines(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}"])
    _, entry, env = parts(build_submit_command(cfg, "configs/tiny-cpu.yaml", ["trainer.steps=2", "run_dir=x"],
                                               "http://head:8265"))
    assert entry[:5] == ["python", "-m", "app.cli", "train", "--no-progress"]
    assert sys.executable not in entry
    assert entry[entry.index("--config") + 1] == "configs/tiny-cpu.yaml"  # relative: it is in the upload
    assert f"run_dir={tmp_path / 'run'}" in entry and "run_dir=x" not in entry and "trainer.steps=2" in entry
    assert not any(e.startswith("envs.iqa_python=") for e in entry)  # resolved on the cluster
    assert env["excludes"] == EXCLUDES and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    _, entry, _ = parts(build_submit_command(cfg, None, [], "http://head:8265", resume=True,
                                             python="/opt/conda/envs/sr/bin/python"))
    assert entry[:6] == ["/opt/conda/envs/sr/bin/python", "-m", "app.cli", "train", "--no-progress", "--resume"]


def test_runtime_env_fields_are_merged_with_ours(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = job_runtime_env({"image_uri": "registry/realsr:1", "env_vars": {"HF_HUB_OFFLINE": "0", "X": "1"},
                           "excludes": ["data/"]})
    assert env["image_uri"] == "registry/realsr:1"
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "0", "X": "1"}
    assert env["excludes"] == EXCLUDES + ["data/"]


def test_cli_dry_run_prints_the_command_and_rejects_bad_json(tmp_path, capsys):
    run = f"run_dir={tmp_path}"
    assert main(["submit", "--dry-run", "--python", "python3.11", "--runtime-env-json", '{"pip": ["x==1"]}', run]) == 0
    out = capsys.readouterr().out
    assert "python3.11 -m app.cli train" in out and '"pip": ["x==1"]' in out
    assert main(["submit", "--dry-run", "--runtime-env-json", "{pip", run]) == 2
    assert "--runtime-env-json is not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("fails, rc, calls", [("2", 0, 3), ("99", 1, None), ("other", 3, 1)])
def test_submit_waits_for_the_heads_job_agent_and_nothing_else(tmp_path, monkeypatch, capsys, fails, rc, calls):
    """A head without its job agent yet made no job: tried again until it takes one, or one line
    naming the head and the ports to free after the wait; any other failure is not retried."""
    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    state = tmp_path / "calls"
    monkeypatch.setenv("STATE", str(state))
    monkeypatch.setenv("FAILS", fails)
    assert run_submit([str(fake), "job", "submit", "--address", "http://head:8265", "--", "true"],
                      agent_wait_s=1.0, retry_s=0.05) == rc
    out, err = capsys.readouterr()
    n = int(state.read_text())
    if calls is not None:
        assert n == calls
    if fails == "2":
        assert "submitted successfully" in out and err.count("trying again") == 2
        assert out.count("Job submission server address") == 2  # every attempt's output passed through
    elif fails == "99":
        assert n > 3 and "submitted successfully" not in out
        last = err.strip().splitlines()[-1]
        assert last.startswith("realsr-r1 submit: the head at http://head:8265 took no job within 1 s")
        assert "--dashboard-agent-listen-port" in last
    else:
        assert "bad entrypoint" in err and "trying again" not in err
