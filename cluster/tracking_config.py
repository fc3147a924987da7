"""The MLflow tracking settings (`tracking.*`) and their checks; the tracking itself is the
GRPO run's (training/tracking.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple
from urllib.parse import urlparse


@dataclass
class TrackingConfig:
    """MLflow (training/tracking.py; docs/cluster.md "Tracking")."""

    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db; a server: http://HOST:PORT
    experiment: str = "realsr-r1"
    run_name: str = ""
    # a store that cannot be reached at start-up refuses the run (before any actor starts);
    # false: a warning, and the run trains untracked
    required: bool = True
    buffer_s: float = 900.0  # metrics/artifacts a server could not take wait this long, then are dropped (counted)
    buffer_values: int = 200000  # and at most this many metric values wait (the oldest are dropped first)
    timeout_s: float = 10.0  # per request to a tracking server (one retry); MLFLOW_HTTP_REQUEST_TIMEOUT wins when set
    system_metrics: bool = True  # CPU, memory, disk, network, GPU (with pynvml) as MLflow's log_system_metrics
    system_metrics_every_s: float = 10.0


def tracking_problems(t: TrackingConfig) -> List[Tuple[str, str]]:
    """What is wrong with a TrackingConfig, as (key, message) pairs (cluster/config.py validates)."""
    out = []
    if t.uri.startswith(("http://", "https://")) and not urlparse(t.uri).hostname:
        out.append(("tracking.uri", f"{t.uri!r} names no host (e.g. http://127.0.0.1:5000)"))
    for name, low, strict in (("buffer_s", 0, False), ("buffer_values", 0, False), ("timeout_s", 0, True),
                              ("system_metrics_every_s", 0, True)):
        v = getattr(t, name)
        if v < low or (strict and v == low):
            out.append((f"tracking.{name}", f"must be {'>' if strict else '>='} {low}, got {v}"))
    return out
