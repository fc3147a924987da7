"""The `ray job submit` command `realsr-r1 submit` builds (no cluster needed)."""

import json
import sys

from app.cli import main
from cluster.config import load_config
from app.submit import EXCLUDES, build_submit_command, job_runtime_env


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
