"""Rollout workers as a pool: least-loaded dispatch and failure recovery.

A prompt's G samples always go to one worker (prefix caching). Prompts go to the worker
with the fewest prompts in flight. A worker that dies mid-call is replaced in its slot
(`cluster.actor_group.ActorGroup`), brought to the current weights by the caller's weight
sync (`on_replaced`), and the dead worker's prompts are dispatched again: every prompt gets
exactly one set of samples, none lost, none duplicated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import RayActorError

from cluster.actor_group import ActorGroup
from rollout.config import RolloutConfig
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """A dispatched generation: prompts out to the workers, results not yet collected."""

    prompts: List[List[int]]
    seed: int
    assignment: Dict[int, List[int]]  # worker index -> positions of its prompts
    calls: Dict[int, Any]  # worker index -> in-flight object ref
    started: float  # perf_counter at dispatch


def worker_seed(seed: int, worker: int) -> int:
    """The sampling seed of one worker's share of a dispatch (the same on a re-dispatch)."""
    return seed + 7919 * worker


class RolloutPool:
    def __init__(self, cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, max_restarts: int = 3,
                 placement: Optional[Callable[[int], Dict[str, Any]]] = None):
        self.cfg = cfg
        self.max_restarts = max_restarts
        self.group = ActorGroup(
            "rollout", RolloutWorker, cfg.num_workers, lambda slot: (cfg, policy_dir, image_cfg, policy_cfg, slot),
            dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_concurrency=1), placement)

    @property
    def workers(self) -> List[Any]:
        return self.group.actors

    @property
    def restarts(self) -> int:
        return self.group.restarts

    # ---- generation ------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], seed: int) -> RolloutBatch:
        """Dispatch prompts (G samples each, on one worker) to the least-loaded workers."""
        load = [0] * len(self.workers)
        assignment: Dict[int, List[int]] = {i: [] for i in range(len(self.workers))}
        for p in range(len(prompts)):
            w = min(range(len(self.workers)), key=lambda i: (load[i], i))
            assignment[w].append(p)
            load[w] += 1
        calls = {w: self.workers[w].generate.remote([prompts[i] for i in idx], None, worker_seed(seed, w))
                 for w, idx in assignment.items() if idx}
        return RolloutBatch([list(p) for p in prompts], seed, assignment, calls, time.perf_counter())

    def collect(self, batch: RolloutBatch, on_replaced: Optional[Callable[[int], None]] = None) -> List[Any]:
        """Results per prompt (list of samples or PromptError), in prompt order. A dead worker
        is replaced, `on_replaced(slot)` brings it to the current weights (the weight sync),
        and its prompts are dispatched again."""
        results: List[Any] = [None] * len(batch.prompts)
        pending = dict(batch.calls)
        assignment = batch.assignment
        while pending:
            w, ref = next(iter(pending.items()))
            try:
                out = ray.get(ref)
            except RayActorError as exc:
                if self.restarts >= self.max_restarts:
                    raise RuntimeError(f"rollout worker {w} died and the restart budget is spent: {exc}") from exc
                log.warning("rollout worker %d died (%s): replacing it and re-dispatching %d prompts",
                            w, type(exc).__name__, len(assignment[w]))
                self.group.replace(w)
                if on_replaced is not None:
                    on_replaced(w)
                pending[w] = self.workers[w].generate.remote([batch.prompts[i] for i in assignment[w]], None,
                                                            worker_seed(batch.seed, w))
                continue
            del pending[w]
            for i, r in zip(assignment[w], out):
                results[i] = r
        return results

    def throughput(self) -> List[Dict[str, float]]:
        return self.group.run("throughput")

    def shutdown(self) -> None:
        self.group.shutdown()
