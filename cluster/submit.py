"""`realsr-r1 submit`: the `ray job submit` call for `realsr-r1 train`.

The job's working directory is this repository without environments, run outputs and VCS
data (the upload stays small); paths a job must share with this machine (run_dir, the IQA
interpreter) are made absolute; MLflow and auth settings travel as environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from cluster.config import REPO_ROOT, Config
from cluster.envs import iqa_python

EXCLUDES = [".venv", ".venv-iqa", "runs", "mlruns", "mlartifacts", ".git", "**/__pycache__", "*.egg-info",
            ".pytest_cache"]


def build_submit_command(cfg: Config, config_path: Optional[str], overrides: List[str], address: str,
                         resume: bool = False) -> List[str]:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE") if k in os.environ}
    env_vars.setdefault("HF_HUB_OFFLINE", "1")
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars}
    entry = [sys.executable, "-m", "cluster.cli", "train", "--no-progress"]
    if resume:
        entry.append("--resume")
    if config_path:
        entry += ["--config", str(Path(config_path).resolve())]
    pinned = [f"run_dir={Path(cfg.run_dir).resolve()}", f"data.output_dir={Path(cfg.data.output_dir).resolve()}",
              f"envs.iqa_python={iqa_python(cfg.envs)}"]
    entry += pinned + [o for o in overrides if not o.startswith(("run_dir=", "data.output_dir=", "envs.iqa_python="))]
    return [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--"] + entry


def run_submit(cmd: List[str]) -> int:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")  # new Ray clusters require the token on the client
    return subprocess.call(cmd, env=env)
