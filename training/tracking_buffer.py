"""What a tracking server could not take yet: metric values and artifacts waiting to be sent.

A run must not end because its tracking server went away, nor grow without bound while it is
away. Every metric value and artifact goes through `Outbox`: it waits, in logging order, until
it is sent, until it is older than `hold_s` seconds, or until more than `max_values` metric
values wait (the oldest go first). What is given up is counted, so the run's summary can say
what the server lost. The clock is a parameter: tests step it instead of sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, List, Optional, Tuple

MAX_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per request


@dataclass
class Pending:
    since: float  # clock time it was logged
    metrics: List[Any] = field(default_factory=list)  # mlflow.entities.Metric, keeping their own timestamps
    artifact: Optional[Tuple[str, Optional[str]]] = None  # (local path, folder in the run)


@dataclass
class Outbox:
    hold_s: float
    max_values: int
    clock: Callable[[], float] = time.monotonic
    items: Deque[Pending] = field(default_factory=deque)
    dropped_values: int = 0
    dropped_artifacts: int = 0
    waiting_values: int = 0

    def add_metrics(self, metrics: List[Any]) -> None:
        if metrics:
            self.items.append(Pending(self.clock(), list(metrics)))
            self.waiting_values += len(metrics)
            self.expire()

    def add_artifact(self, path: str, folder: Optional[str]) -> None:
        self.items.append(Pending(self.clock(), artifact=(path, folder)))
        self.expire()

    def __len__(self) -> int:
        return len(self.items)

    def expire(self) -> int:
        """Give up what waited longer than hold_s, then the oldest values beyond max_values;
        returns how many items were given up."""
        now, gone = self.clock(), 0
        while self.items and (now - self.items[0].since > self.hold_s or self.waiting_values > self.max_values):
            self._drop(self.items.popleft())
            gone += 1
        return gone

    def drop_all(self) -> None:
        while self.items:
            self._drop(self.items.popleft())

    def _drop(self, item: Pending) -> None:
        self.dropped_values += len(item.metrics)
        self.waiting_values -= len(item.metrics)
        self.dropped_artifacts += item.artifact is not None

    def next_send(self) -> Tuple[List[Any], Optional[Tuple[str, Optional[str]]], int]:
        """The next request to make, oldest first: (metrics up to MAX_BATCH values from
        consecutive waiting metric items, None, items) or ([], (path, folder), 1)."""
        if not self.items:
            return [], None, 0
        if self.items[0].artifact is not None:
            return [], self.items[0].artifact, 1
        batch: List[Any] = []
        n = 0
        for item in self.items:
            if item.artifact is not None or (batch and len(batch) + len(item.metrics) > MAX_BATCH):
                break
            batch.extend(item.metrics)
            n += 1
        return batch, None, n

    def sent(self, n: int) -> None:
        """The first n items reached the server."""
        for _ in range(n):
            self.waiting_values -= len(self.items.popleft().metrics)

    def refused(self, n: int) -> None:
        """The server answered that the first n items are wrong (not a passing failure): they
        are given up at once, counted, so they do not hold back what follows."""
        for _ in range(n):
            self._drop(self.items.popleft())
