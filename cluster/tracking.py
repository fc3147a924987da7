"""MLflow tracking that never stops training.

URI: `tracking.uri`, else MLFLOW_TRACKING_URI, else a sqlite store in the run directory
(MLflow 3 refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE is set). Any
tracking failure (server down, bad URI) is reported once and tracking is switched off.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


def resolve_uri(uri: str, run_dir: str) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def set_uri_keeping_environment(mlflow, uri: str) -> None:
    """Point MLflow's fluent API at `uri` without leaving it in MLFLOW_TRACKING_URI: MLflow
    exports the URI there for subprocesses, so a later run in the same process (or a job it
    submits, which forwards the variable) would otherwise log into this run's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: str, resume_run_id: Optional[str] = None):
        self.enabled = True
        self.run_id: Optional[str] = None
        self.uri = resolve_uri(uri, run_dir)
        try:
            import mlflow

            self.mlflow = mlflow
            set_uri_keeping_environment(mlflow, self.uri)
            artifacts = (Path(run_dir).resolve() / "mlartifacts").as_uri()
            exp = mlflow.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment, artifact_location=artifacts)
            run = mlflow.start_run(run_id=resume_run_id) if resume_run_id else mlflow.start_run(experiment_id=exp_id, run_name=run_name or None)
            self.run_id = run.info.run_id
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if self.enabled:
            import traceback

            frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f" at {frame.filename}:{frame.lineno}" if frame else ""
            log.warning("MLflow tracking at %s is unavailable (%s: %s%s); training continues without it",
                        self.uri, type(exc).__name__, exc, where)
            print(f"warning: MLflow tracking at {self.uri} unavailable ({type(exc).__name__}); training continues")
        self.enabled = False

    def params(self, params: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            clean = {k[:250]: str(v)[:6000] for k, v in params.items()}
            items = list(clean.items())
            for i in range(0, len(items), 100):
                self.mlflow.log_params(dict(items[i:i + 100]))
        except Exception as exc:
            self._fail(exc)

    def metrics(self, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
            self.mlflow.log_metrics(finite, step=step)
        except Exception as exc:
            self._fail(exc)

    def artifact(self, path: str, folder: Optional[str] = None) -> None:
        if not self.enabled:
            return
        try:
            self.mlflow.log_artifact(path, artifact_path=folder)
        except Exception as exc:
            self._fail(exc)

    def close(self) -> None:
        if self.enabled:
            try:
                self.mlflow.end_run()
            except Exception as exc:
                self._fail(exc)
