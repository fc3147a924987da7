"""One abstraction for the actors of a role (learner ranks, rollout workers, reward workers).

`ActorGroup` starts N actors of one class with the role's resources and optional placement,
waits for them with a timeout that names what they asked for and what the cluster has free,
replaces a dead actor in its slot, grows by new actors or drops dead ones (an elastic pool),
calls a method on every actor (or one shard per actor), and stops them, logging what could
not be stopped instead of swallowing it. The pools add
only what is their own: dispatch, retries, weight sync, sharding a batch over ranks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)
Placement = Callable[[int], Dict[str, Any]]


def resource_options(resources: Dict[str, float]) -> Dict[str, Any]:
    """Ray options for a role's custom resources (`{"inference_node": 1}` pins a role to the
    nodes that advertise it); nothing when there are none."""
    return {"resources": dict(resources)} if resources else {}


class ActorGroup:
    def __init__(self, role: str, actor_cls, count: int, args: Callable[[int], Sequence[Any]],
                 options: Dict[str, Any], placement: Optional[Placement] = None, ready: str = "ready",
                 ready_timeout_s: float = 600.0):
        """`args(slot)` gives the constructor arguments of the actor in `slot`; `options` its Ray
        resources (num_cpus, num_gpus, runtime_env, ...); `placement(slot)` may add a
        placement-group bundle; `ready` names the method whose return means the actor is up."""
        self.role, self.actor_cls, self.args = role, actor_cls, args
        self.options, self.placement = dict(options), placement
        self.ready_method, self.ready_timeout_s = ready, ready_timeout_s
        self.restarts = 0
        self.workers: List[Any] = [self._start(slot) for slot in range(count)]
        self.ready_reports = self._wait_ready(list(range(count)))

    def __len__(self) -> int:
        return len(self.workers)

    def _start(self, slot: int, placed: bool = True):
        extra = self.placement(slot) if self.placement and placed else {}
        return self.actor_cls.options(**{**self.options, **extra}).remote(*self.args(slot))

    def _wait_ready(self, slots: List[int], stop_all: bool = True) -> List[Any]:
        """The ready reports of the actors in `slots`. On failure every actor of the group is
        stopped (`stop_all`, at start-up) or only those in `slots` (a replacement or growth)."""
        refs = [getattr(self.workers[s], self.ready_method).remote() for s in slots]
        try:
            return ray.get(refs, timeout=self.ready_timeout_s)
        except GetTimeoutError:
            message = f"{self.role} actors not ready after {self.ready_timeout_s:.0f}s: " + self.demand()
            self._stop_after_failure(slots, stop_all)
            raise RuntimeError(message) from None
        except RayActorError as exc:  # a constructor raised: its last line says why
            self._stop_after_failure(slots, stop_all)
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise RuntimeError(f"a {self.role} actor failed to start: {lines[-1] if lines else exc}") from exc

    def _stop_after_failure(self, slots: List[int], stop_all: bool) -> None:
        if stop_all:
            self.shutdown()
        else:
            self.remove(slots)

    def demand(self) -> str:
        """What each actor asks for against what the cluster has free (for error messages)."""
        asked = {k: v for k, v in self.options.items() if k in ("num_cpus", "num_gpus", "resources")}
        return f"each asks for {asked}; the cluster has {ray.available_resources()} free"

    def replace(self, slot: int) -> Any:
        """Stop the actor in `slot` (if it still runs), start a new one there and wait for it."""
        self._kill(slot)
        self.workers[slot] = self._start(slot)
        self.restarts += 1
        self.ready_reports[slot] = self._wait_ready([slot], stop_all=False)[0]
        return self.ready_reports[slot]

    def grow(self, count: int) -> List[Any]:
        """Start `count` more actors (outside any placement group: they take what the cluster
        has free) and return their ready reports."""
        first = len(self.workers)
        self.workers += [self._start(slot, placed=False) for slot in range(first, first + count)]
        self.ready_reports += [None] * count
        reports = self._wait_ready(list(range(first, first + count)), stop_all=False)
        self.ready_reports[first:] = reports
        return reports

    def remove(self, slots: Sequence[int]) -> None:
        """Stop the actors in `slots` and drop them; later actors move down to fill the gaps."""
        for slot in sorted(set(slots), reverse=True):
            self._kill(slot)
            del self.workers[slot]
            if slot < len(self.ready_reports):
                del self.ready_reports[slot]

    def call(self, method: str, *args, shards: Optional[Sequence[Any]] = None) -> List[Any]:
        """Object refs of `method(*args)` on every actor, or of `method(*args, shards[i])` on
        actor i when `shards` is given (one per actor)."""
        if shards is not None:
            if len(shards) != len(self.workers):
                raise ValueError(f"{len(shards)} shards for {len(self.workers)} {self.role} actors")
            return [getattr(a, method).remote(*args, s) for a, s in zip(self.workers, shards)]
        return [getattr(a, method).remote(*args) for a in self.workers]

    def run(self, method: str, *args, shards: Optional[Sequence[Any]] = None) -> List[Any]:
        """`call` and wait for every result."""
        return ray.get(self.call(method, *args, shards=shards))

    def _kill(self, slot: int) -> None:
        try:
            ray.kill(self.workers[slot])
        except Exception as exc:  # already gone is fine; say so rather than hide it
            log.info("%s actor %d could not be killed (%s: %s): it is already gone", self.role, slot,
                     type(exc).__name__, exc)

    def shutdown(self) -> None:
        for slot in range(len(self.workers)):
            self._kill(slot)
        self.workers = []
