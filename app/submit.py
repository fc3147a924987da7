"""`realsr-r1 submit`: the `ray job submit` call for `realsr-r1 train`.

The job's working directory is this repository without environments, run outputs and VCS
data (the upload stays small). The entrypoint runs under the cluster's interpreter:
`python -m app.cli` as found on the head node's PATH, or `--python PATH` (never this
machine's interpreter path, which other machines need not have). `run_dir` and
`data.output_dir` are made absolute (on a cluster, point them at a filesystem the nodes
share); the IQA interpreter is whatever `envs.iqa_python` says on the cluster ("auto": the
`.venv-iqa` beside the cluster's environment). MLflow and auth settings travel as
environment variables; `--runtime-env-json` adds Ray runtime-env fields (a container image,
`pip`, `py_executable`, more `env_vars`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from cluster.config import REPO_ROOT, Config
from vlcot.errors import UserError

EXCLUDES = [".venv", ".venv-iqa", "runs", "mlruns", "mlartifacts", ".git", "**/__pycache__", "*.egg-info",
            ".pytest_cache"]
PINNED = ("run_dir=", "data.output_dir=")
NO_AGENT = "No available agent to submit job"  # the head's answer before its dashboard agent is up: no job was made


def job_runtime_env(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Our runtime env (upload excludes, MLflow/offline variables) with the user's fields on top
    (their `env_vars` are merged into ours, theirs winning)."""
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE") if k in os.environ}
    env_vars.setdefault("HF_HUB_OFFLINE", "1")
    runtime_env: Dict[str, Any] = {"excludes": EXCLUDES, "env_vars": env_vars}
    for key, value in (extra or {}).items():
        if key == "env_vars":
            runtime_env["env_vars"] = {**env_vars, **value}
        elif key == "excludes":
            runtime_env["excludes"] = EXCLUDES + [e for e in value if e not in EXCLUDES]
        else:
            runtime_env[key] = value
    return runtime_env


def runtime_env_arg(text: str) -> Dict[str, Any]:
    """`--runtime-env-json`: a JSON object of Ray runtime-env fields; `env_vars` (if given) maps
    names to strings and `excludes` is a list of strings. Anything else is refused here, in one
    line, not by Ray after the upload."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--runtime-env-json is not JSON ({exc.msg} at column {exc.colno}): {text}; give an object, "
                        'e.g. \'{"env_vars": {"KEY": "value"}}\'') from None
    if not isinstance(value, dict):
        raise UserError(f"--runtime-env-json {text}: a JSON {type(value).__name__}, not an object of runtime-env "
                        'fields, e.g. \'{"image_uri": "..."}\'')
    env_vars = value.get("env_vars", {})
    if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
        raise UserError(f"--runtime-env-json {text}: env_vars must map names to strings, e.g. "
                        '{"env_vars": {"HF_HOME": "/data/hf"}}')
    excludes = value.get("excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise UserError(f"--runtime-env-json {text}: excludes must be a list of path patterns (strings)")
    return value


def build_submit_command(cfg: Config, config_path: Optional[str], overrides: List[str], address: str,
                         resume: bool = False, python: str = "python",
                         runtime_env: Optional[Dict[str, Any]] = None) -> List[str]:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    entry = [python, "-m", "app.cli", "train", "--no-progress"]
    if resume:
        entry.append("--resume")
    if config_path:
        entry += ["--config", os.path.relpath(Path(config_path).resolve(), REPO_ROOT)
                  if Path(config_path).resolve().is_relative_to(REPO_ROOT) else str(Path(config_path).resolve())]
    pinned = [f"run_dir={Path(cfg.run_dir).resolve()}", f"data.output_dir={Path(cfg.data.output_dir).resolve()}"]
    entry += pinned + [o for o in overrides if not o.startswith(PINNED)]
    return [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
            "--runtime-env-json", json.dumps(job_runtime_env(runtime_env)), "--"] + entry


def _relay(source: TextIO, sink: TextIO, seen: List[str]) -> None:
    """Pass `source`'s lines to `sink` as they come, remembering whether the head said it had no agent."""
    for line in source:
        sink.write(line)
        sink.flush()
        if NO_AGENT in line:
            seen.append(line)


def run_submit(cmd: List[str], agent_wait_s: float = 60.0, retry_s: float = 3.0) -> int:
    """Run `ray job submit`, its output passed through as it comes. A head that has no job agent
    yet (just started: `ray start` returns before its dashboard agent takes jobs) made no job, so
    the submission is tried again every `retry_s` for up to `agent_wait_s`; then one line says why."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")  # new Ray clusters require the token on the client
    deadline = time.monotonic() + agent_wait_s
    while True:
        seen: List[str] = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              errors="replace", bufsize=1) as proc:  # on Ctrl-C: waits for ray's own exit
            relays = [threading.Thread(target=_relay, args=(src, dst, seen), daemon=True)
                      for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
            for t in relays:
                t.start()
            rc = proc.wait()
            for t in relays:
                t.join()
        if rc == 0 or not seen:
            return rc
        if time.monotonic() + retry_s > deadline:
            address = cmd[cmd.index("--address") + 1] if "--address" in cmd else "the head"
            print(f"realsr-r1 submit: the head at {address} took no job within {agent_wait_s:.0f} s: its dashboard "
                  f"agent is not up. If another Ray runs on the head's machine, start the head with free ports "
                  f"(ray start --head --dashboard-agent-listen-port=PORT --dashboard-agent-grpc-port=PORT "
                  f"--runtime-env-agent-port=PORT)",
                  file=sys.stderr)
            return rc
        print(f"realsr-r1 submit: the head has no job agent yet; trying again in {retry_s:.0f} s", file=sys.stderr)
        time.sleep(retry_s)
