"""MLflow tracking: a local store by default, a tracking server as clusters use it.

URI: `tracking.uri`, else MLFLOW_TRACKING_URI, else a sqlite store in the run directory
(MLflow 3 refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE is set).

- Artifacts: a local store keeps them in `<run_dir>/mlartifacts`; with a server they go where
  the server says (its default artifact root or its proxied artifact store), so the server's UI
  shows them. An experiment that already exists keeps its own location either way.
- Start-up: a store that cannot be reached or refuses (a server down, a wrong address, no
  permission) is a `UserError` naming the URI when `tracking.required` (the default): a long
  GPU job must not run untracked by accident. `tracking.required=false` makes it a warning and
  the run trains without tracking.
- During the run: a failed request never ends the run. Metric values and artifacts wait in an
  `Outbox` (training/tracking_buffer.py) and are sent, in order and with their own timestamps,
  once the server answers again; what waited longer than `tracking.buffer_s` (or beyond
  `tracking.buffer_values`) is dropped and counted in the run's summary. Each request to a
  server gets `tracking.timeout_s` and one retry (MLflow's own default retries for minutes),
  and a failed server is asked again after RETRY_S seconds, doubling up to RETRY_MAX_S while
  it stays away, so a GRPO step is not held up for long.
- System metrics (CPU, memory, disk, network; GPU when pynvml is installed) come from MLflow's
  own `SystemMetricsMonitor` (what `log_system_metrics=True` starts), `tracking.system_metrics`.

Only MlflowClient calls with an explicit URI are used: nothing is left in MLflow's global
state or in MLFLOW_TRACKING_URI for a later run in the same process or a job it submits.
MLflow itself is imported inside the methods that call it (seconds to import; a run with
tracking off never loads it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from training.run_state import CKPT_DIR, DriverState, latest_checkpoint
from training.tracking_buffer import Outbox
from vlcot.errors import UserError

log = logging.getLogger(__name__)
RETRY_S, RETRY_MAX_S = 5.0, 60.0  # a failed server is asked again after 5 s, 10 s, ... 60 s (or at a flush)
SERVER_SCHEMES = ("http://", "https://", "databricks")
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def resolve_uri(uri: str, run_dir: str) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """A tracking server decides where artifacts go; a local store (sqlite, a folder) does not."""
    return uri.startswith(SERVER_SCHEMES)


def passing(exc: BaseException) -> bool:
    """A failure that may pass (no answer, a timeout, a 5xx or 429), as opposed to the server
    answering that the request itself is wrong (any other 4xx) or a local file that is not
    there or not readable (retrying would hold up everything behind it)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return code >= 500 or code == 429
    return True


def reason(exc: BaseException, timeout_s: float) -> str:
    """One short phrase for why a request failed (MLflow's messages run to many lines)."""
    text = str(exc)
    if "Connection refused" in text or "Failed to establish a new connection" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    if "timed out" in text or "timeout" in text.lower():
        return f"no answer within {timeout_s:g}s"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: str, resume_run_id: Optional[str] = None,
                 required: bool = False, buffer_s: float = 900.0, buffer_values: int = 200_000,
                 timeout_s: float = 10.0, system_metrics: bool = False, system_metrics_every_s: float = 10.0):
        self.enabled = True
        self.run_id: Optional[str] = None
        self.resumed = False  # continuing resume_run_id (not a new run)
        self.uri = resolve_uri(uri, run_dir)
        self.server = is_server(self.uri)
        self.timeout_s = timeout_s
        self.outbox = Outbox(buffer_s, buffer_values)
        self.monitor = None
        self.outages = 0  # times the server stopped answering during the run
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._retry_s = RETRY_S
        self._saved_env: Dict[str, Optional[str]] = {}
        if self.server:
            self._short_requests()
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment(experiment, run_dir)
            self.run_id = self._start(resume_run_id, run_name, required)
        except UserError:
            self._restore_env()
            raise
        except Exception as exc:
            if required:
                self._restore_env()
                raise UserError(f"MLflow tracking at {self.uri} is not usable ({reason(exc, timeout_s)}): start the "
                                "server or fix tracking.uri, or set tracking.required=false to train without it") from None
            self._off(exc)
        if system_metrics and self.enabled:
            self._start_monitor(self.resumed, system_metrics_every_s)

    # ---- start-up ------------------------------------------------------------------------------
    def _short_requests(self) -> None:
        """Each request to the server gets timeout_s and one retry, unless the user set
        MLflow's variables; restored at close."""
        # urllib3 logs each retry as a multi-line warning; the tracker says it in one line itself
        self._quieted = logging.getLogger("urllib3.connectionpool")
        self._quieted_level = self._quieted.level
        self._quieted.setLevel(logging.ERROR)
        wanted = {**HTTP_ENV, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(self.timeout_s)))}
        for key, value in wanted.items():
            if key not in os.environ:
                self._saved_env[key] = None
                os.environ[key] = value

    def _restore_env(self) -> None:
        for key in self._saved_env:
            os.environ.pop(key, None)
        self._saved_env = {}
        if getattr(self, "_quieted", None) is not None:
            self._quieted.setLevel(self._quieted_level)
            self._quieted = None

    def _experiment(self, name: str, run_dir: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # a local store keeps artifacts beside its database; a server places them itself
        location = None if self.server else (Path(run_dir).resolve() / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _start(self, resume_run_id: Optional[str], run_name: str, required: bool) -> str:
        from mlflow.exceptions import MlflowException

        if resume_run_id:
            try:
                self.client.get_run(resume_run_id)
            except MlflowException as exc:
                if passing(exc):
                    raise
                if required:
                    raise UserError(f"--resume: the checkpoint's MLflow run {resume_run_id} is not in {self.uri}: point "
                                    "tracking.uri at the store it was logged to, or set tracking.required=false to "
                                    "go on in a new run") from None
                print(f"warning: the checkpoint's MLflow run {resume_run_id} is not in {self.uri}; logging to a new run")
            else:
                self.client.update_run(resume_run_id, status="RUNNING")
                self.resumed = True
                return resume_run_id
        from mlflow.tracking.context.registry import resolve_tags

        return self.client.create_run(self.experiment_id, run_name=run_name or None, tags=resolve_tags()).info.run_id

    def _start_monitor(self, resumed: bool, every_s: float) -> None:
        self._monitor_every_s = every_s
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every_s, resume_logging=resumed,
                                                tracking_uri=self.uri)
            self.monitor.start()
        except Exception as exc:  # e.g. psutil missing: the run is tracked, without system metrics
            print(f"warning: no MLflow system metrics ({type(exc).__name__}: {exc})")
            self.monitor = None

    def _off(self, exc: Exception) -> None:
        log.warning("MLflow tracking at %s is unavailable (%s: %s); training continues without it",
                    self.uri, type(exc).__name__, exc)
        print(f"warning: MLflow tracking at {self.uri} unavailable ({reason(exc, self.timeout_s)}); "
              "training continues untracked (tracking.required=false)")
        self.enabled = False
        self._restore_env()

    def where(self) -> str:
        """Where to look at the run (the line the driver prints at start-up)."""
        if self.server:
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}"

    # ---- logging -------------------------------------------------------------------------------
    def params(self, params: Dict[str, Any]) -> None:
        """The run's parameters, once at its start (right after the store answered): a failure
        is a warning, not buffered."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        try:
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as exc:
            log.warning("MLflow params not logged (%s)", reason(exc, self.timeout_s))
            print(f"warning: MLflow params not logged ({reason(exc, self.timeout_s)})")

    def metrics(self, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.outbox.add_metrics([Metric(k, float(v), now_ms, step) for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and math.isfinite(float(v))])
        self.flush(force=False)

    def artifact(self, path: str, folder: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self.outbox.add_artifact(str(path), folder)
        self.flush(force=False)

    def flush(self, force: bool = True) -> bool:
        """Send what waits, oldest first. Returns True when nothing waits any more. Without
        `force`, a server that failed is not asked again before its retry time."""
        if not self.enabled:
            return True
        self.outbox.expire()
        if not self.outbox or (not force and time.monotonic() < self._next_try):
            return not self.outbox
        while self.outbox:
            metrics, art, n = self.outbox.next_send()
            try:
                if art is not None:
                    self.client.log_artifact(self.run_id, art[0], art[1])
                else:
                    self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as exc:
                if not passing(exc):  # the store answered: this request is wrong, retrying won't help
                    log.warning("MLflow refused %s: %s", art[0] if art else f"{len(metrics)} metric values",
                                reason(exc, self.timeout_s))
                    self.outbox.refused(n)
                    continue
                self._down(exc)
                return False
            self.outbox.sent(n)
        self._up()
        return True

    def _down(self, exc: Exception) -> None:
        self._next_try = time.monotonic() + self._retry_s
        self._retry_s = min(RETRY_MAX_S, 2 * self._retry_s)  # a server that hangs costs a step less and less often
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            print(f"warning: MLflow tracking at {self.uri} not answering ({reason(exc, self.timeout_s)}); metrics "
                  f"and artifacts wait up to {self.outbox.hold_s:g}s for it, training goes on")

    def _up(self) -> None:
        if self._down_since is not None:
            print(f"MLflow tracking at {self.uri} answering again after {time.monotonic() - self._down_since:.0f}s; "
                  f"values waiting were sent, {self.outbox.dropped_values} dropped so far")
            self._down_since, self._retry_s = None, RETRY_S
            thread = getattr(self.monitor, "_process", None)
            if self.monitor is not None and (thread is None or not thread.is_alive()):
                self._start_monitor(True, self._monitor_every_s)  # MLflow's monitor stops at its first failure

    # ---- the end ---------------------------------------------------------------------------------
    def report(self) -> Dict[str, Any]:
        """What the tracking store lost (the run summary's `tracking`)."""
        return {"uri": self.uri, "run_id": self.run_id, "enabled": self.enabled, "outages": self.outages,
                "dropped_metric_values": self.outbox.dropped_values,
                "dropped_artifacts": self.outbox.dropped_artifacts}

    def close(self, status: str = "FINISHED") -> None:
        """Stop the system monitor, send what waits (one try), end the run; what still waits
        is dropped and counted."""
        if not self.enabled:
            return
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as exc:
                log.warning("system metrics monitor did not stop cleanly: %s", exc)
        if not self.flush(force=True):
            self.outbox.drop_all()
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            print(f"warning: MLflow run {self.run_id} not marked {status} ({reason(exc, self.timeout_s)})")
        self._restore_env()


def lost_line(report: Optional[Dict[str, Any]]) -> str:
    """"" when the store got everything, else what it lost (appended to the end-of-run line)."""
    if not report:
        return ""
    if not report["enabled"]:
        return "; untracked (MLflow unavailable at start)"
    if report["dropped_metric_values"] or report["dropped_artifacts"]:
        return (f"; MLflow lost {report['dropped_metric_values']} metric values and {report['dropped_artifacts']} "
                f"artifacts ({report['outages']} outages)")
    return ""


def open_run_tracker(cfg, run_dir: Path, resume: bool) -> Tracker:
    """The training run's tracker, opened before any actor starts (a required server that does
    not answer refuses the run here); on --resume, the run of the newest checkpoint."""
    t = cfg.tracking
    ckpt = latest_checkpoint(str(run_dir)) if resume else None
    if resume and ckpt is None:  # before a run is made on the store for nothing
        raise UserError(f"--resume: no checkpoint under {Path(run_dir) / CKPT_DIR} (train without --resume to start)")
    run_id = DriverState.read(ckpt).mlflow_run_id if ckpt is not None else None
    tracker = Tracker(t.uri, t.experiment, t.run_name, str(run_dir), run_id, required=t.required, buffer_s=t.buffer_s,
                      buffer_values=t.buffer_values, timeout_s=t.timeout_s, system_metrics=t.system_metrics,
                      system_metrics_every_s=t.system_metrics_every_s)
    if tracker.enabled:
        print(f"MLflow: {tracker.uri} experiment {t.experiment!r} run {tracker.run_id}"
              + (" (resumed)" if tracker.resumed else "") + f" (view: {tracker.where()})")
    return tracker
