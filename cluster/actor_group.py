"""One abstraction for the actors of a role (learner ranks, rollout workers, reward actors).

`ActorGroup` starts N actors of one class with the role's resources and optional placement,
waits for them with a timeout that names what they asked for and what the cluster has free,
replaces a dead actor in its slot, calls a method on every actor (or one shard per actor),
and stops them, logging what could not be stopped instead of swallowing it. The pools add
only what is their own: dispatch, retries, weight sync, sharding a batch over ranks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)
Placement = Callable[[int], Dict[str, Any]]


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
        self.actors: List[Any] = [self._start(slot) for slot in range(count)]
        self.info = self._wait_ready(list(range(count)))

    def __len__(self) -> int:
        return len(self.actors)

    def _start(self, slot: int):
        extra = self.placement(slot) if self.placement else {}
        return self.actor_cls.options(**self.options, **extra).remote(*self.args(slot))

    def _wait_ready(self, slots: List[int]) -> List[Any]:
        refs = [getattr(self.actors[s], self.ready_method).remote() for s in slots]
        try:
            return ray.get(refs, timeout=self.ready_timeout_s)
        except GetTimeoutError:
            asked = {k: v for k, v in self.options.items() if k in ("num_cpus", "num_gpus", "resources")}
            self.shutdown()
            raise RuntimeError(f"{self.role} actors not ready after {self.ready_timeout_s:.0f}s: each asks for "
                               f"{asked}; the cluster has {ray.available_resources()} free") from None
        except RayActorError as exc:  # a constructor raised: its last line says why
            self.shutdown()
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise RuntimeError(f"a {self.role} actor failed to start: {lines[-1] if lines else exc}") from exc

    def replace(self, slot: int) -> Any:
        """Stop the actor in `slot` (if it still runs), start a new one there and wait for it."""
        self._kill(slot)
        self.actors[slot] = self._start(slot)
        self.restarts += 1
        return self._wait_ready([slot])[0]

    def call(self, method: str, *args, shards: Optional[Sequence[Any]] = None) -> List[Any]:
        """Object refs of `method(*args)` on every actor, or of `method(*args, shards[i])` on
        actor i when `shards` is given (one per actor)."""
        if shards is not None:
            if len(shards) != len(self.actors):
                raise ValueError(f"{len(shards)} shards for {len(self.actors)} {self.role} actors")
            return [getattr(a, method).remote(*args, s) for a, s in zip(self.actors, shards)]
        return [getattr(a, method).remote(*args) for a in self.actors]

    def run(self, method: str, *args, shards: Optional[Sequence[Any]] = None) -> List[Any]:
        """`call` and wait for every result."""
        return ray.get(self.call(method, *args, shards=shards))

    def _kill(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot])
        except Exception as exc:  # already gone is fine; say so rather than hide it
            log.info("%s actor %d could not be killed (%s: %s): it is already gone", self.role, slot,
                     type(exc).__name__, exc)

    def shutdown(self) -> None:
        for slot in range(len(self.actors)):
            self._kill(slot)
        self.actors = []
