"""Rollout workers as a pool: least-loaded dispatch, failure recovery, weight sync.

A prompt's G samples always go to one worker (prefix caching). Prompts go to the worker
with the fewest prompts in flight. A worker that dies mid-call is replaced, the weight
group is rebuilt (a new worker cannot join a formed process group) and resynced to the
current weights, and the dead worker's prompts are dispatched again: every prompt gets
exactly one set of samples, none lost, none duplicated.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import RayActorError

from cluster.transport import WeightTransport, free_port
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
        self.cfg, self.policy_dir, self.image_cfg, self.policy_cfg = cfg, policy_dir, image_cfg, policy_cfg
        self.placement = placement
        self.max_restarts = max_restarts
        self.restarts = 0
        self.workers = [self._start(i) for i in range(cfg.num_workers)]
        self.info = ray.get([w.ready.remote() for w in self.workers])
        self.backend = "nccl" if cfg.gpus_per_worker > 0 else "gloo"

    def _start(self, index: int):
        extra = self.placement(index) if self.placement else {}
        return RolloutWorker.options(num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker,
                                     max_concurrency=1, **extra).remote(self.cfg, self.policy_dir, self.image_cfg,
                                                                        self.policy_cfg, index)

    # ---- weights ---------------------------------------------------------------------------
    def join_weight_group(self, learner) -> None:
        """Form the broadcast group {learner rank 0, every worker}."""
        port, world = free_port(), len(self.workers) + 1
        refs = learner.join_weight_group(functools.partial(WeightTransport, "127.0.0.1", port, 0, world, self.backend))
        refs += [w.join_weight_group.remote(functools.partial(WeightTransport, "127.0.0.1", port, i + 1, world, self.backend))
                 for i, w in enumerate(self.workers)]
        ray.get(refs)

    def sync(self, learner, version: int) -> Dict[str, float]:
        """Broadcast the learner's weights to every worker; returns learner-side sync stats."""
        t0 = time.perf_counter()
        receives = [w.receive_weights.remote() for w in self.workers]
        stats = ray.get(learner.broadcast_async(version))[0]
        ray.get(receives)
        stats = dict(stats)
        stats["timing/sync_s"] = time.perf_counter() - t0
        return stats

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

    def collect(self, batch: RolloutBatch, learner=None, version: Optional[int] = None) -> List[Any]:
        """Results per prompt (list of samples or PromptError), in prompt order. Dead workers
        are replaced, resynced from `learner` (at `version`) and their prompts rerun."""
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
                self._replace(w, learner, version)
                pending[w] = self.workers[w].generate.remote([batch.prompts[i] for i in assignment[w]], None,
                                                            worker_seed(batch.seed, w))
                continue
            del pending[w]
            for i, r in zip(assignment[w], out):
                results[i] = r
        return results

    def _replace(self, index: int, learner, version: Optional[int]) -> None:
        try:
            ray.kill(self.workers[index])
        except Exception:
            pass
        self.workers[index] = self._start(index)
        ray.get(self.workers[index].ready.remote())
        self.restarts += 1
        if learner is not None:
            self.join_weight_group(learner)
            self.sync(learner, version if version is not None else 0)

    def throughput(self) -> List[Dict[str, float]]:
        return ray.get([w.throughput.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []
