"""Starting actors in another role's Python environment on a real Ray cluster."""

from __future__ import annotations

from typing import Any, Dict

import ray

from cluster.config import EnvConfig
from cluster.interpreters import probe_environment, runtime_env_for_iqa


@ray.remote(num_cpus=0)
class EnvProbe:
    """Reports the environment it runs in; the IQA roles' smoke test."""

    def probe(self, import_pyiqa: bool) -> Dict[str, Any]:
        return probe_environment(import_pyiqa=import_pyiqa)


def probe_iqa_env_in_ray(cfg: EnvConfig, timeout_s: float = 180.0) -> Dict[str, Any]:
    """Start an actor under the IQA interpreter, import pyiqa there and return its report.
    Starts a local Ray if none is running (and stops it again)."""
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        actor = EnvProbe.options(runtime_env=runtime_env_for_iqa(cfg)).remote()
        report = ray.get(actor.probe.remote(True), timeout=timeout_s)
        ray.kill(actor)
        return report
    finally:
        if started:
            ray.shutdown()
