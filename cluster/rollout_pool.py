"""Rollout workers as a pool: least-loaded dispatch, failure recovery and elastic size.

A prompt's G samples always go to one worker (prefix caching). Prompts go to the worker
with the fewest prompts in flight; workers are spread over nodes (Ray's SPREAD strategy,
unless a placement group places them). A worker that dies mid-call is replaced in its slot
(`cluster.actor_group.ActorGroup`), brought to the current weights by the pool's weight
sync, and the dead worker's prompts are dispatched again: every prompt gets
exactly one set of samples, none lost, none duplicated.

With `rollout.autoscale`, a dead worker is dropped instead (its node is usually gone with it)
and its prompts go to the living workers; between steps, `grow()` starts as many new workers
as the cluster's free resources fit (a node joined), up to `rollout.max_workers`.

The pool owns the weight sync to its workers (`connect_weights`, then `sync_weights(version)`):
a replaced worker is brought to the current weights before it reruns a call, and the weight
group is formed again whenever workers are dropped or added, inside the pool.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import ray
from ray.exceptions import RayActorError

from cluster.actor_group import ActorGroup, resource_options
from cluster.guidance import GuidanceCounter
from cluster.weight_sync import WEIGHT_SYNCS, SyncReport, WeightSync, sync_living_workers
from comm.nodes import node_alive
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
    lost_nodes: List[str] = field(default_factory=list)  # nodes of the workers dropped while collecting it
    n: Optional[int] = None  # samples per prompt (None: rollout.group_size)
    greedy: bool = False

    @property
    def worker_count(self) -> int:
        """Workers the batch was dispatched to."""
        return len(self.calls)


@dataclass
class PendingCall:
    worker: int
    positions: List[int]  # prompt positions in the batch
    seed: int
    ref: Any


@dataclass
class PoolChange:
    """What `check_workers` did: nodes of the workers it dropped, slots it refilled."""

    lost_nodes: List[str]
    replaced: List[int]

    def __bool__(self) -> bool:
        return bool(self.lost_nodes or self.replaced)


def worker_seed(seed: int, worker: int) -> int:
    """The sampling seed of one worker's share of a dispatch (the same on a re-dispatch)."""
    return seed + 7919 * worker


class RolloutPool:
    def __init__(self, cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, max_restarts: int = 3,
                 placement: Optional[Callable[[int], Dict[str, Any]]] = None, ready_timeout_s: float = 600.0):
        self.cfg = cfg
        self.max_restarts = max_restarts
        self.lost_count = 0  # workers dropped (autoscale)
        self.weight_sync: Optional[WeightSync] = None  # connect_weights
        self.guidance = GuidanceCounter(on_gpu=cfg.gpus_per_worker > 0)
        options = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_concurrency=1,
                       scheduling_strategy="SPREAD", **resource_options(cfg.resources))
        self.group = ActorGroup(
            "rollout", RolloutWorker, cfg.num_workers, lambda slot: (cfg, policy_dir, image_cfg, policy_cfg, slot),
            options, placement, ready_timeout_s=ready_timeout_s)

    @property
    def workers(self) -> List[Any]:
        return self.group.workers

    @property
    def restarts(self) -> int:
        return self.group.restarts

    # ---- weights ---------------------------------------------------------------------------
    def connect_weights(self, learner, run_cfg) -> None:
        """The weight sync from `learner` (a LearnerGroup) to this pool's workers, as
        `trainer.weight_sync` of the run's Config `run_cfg` names it, connected."""
        self.weight_sync = WEIGHT_SYNCS.get(run_cfg.trainer.weight_sync)(learner, self.group, run_cfg)
        self.weight_sync.connect()

    def sync_weights(self, version: int) -> SyncReport:
        """Every living worker holds the learner's weights, stamped `version` (dead workers are
        dropped or replaced first, and again if one goes away during the sync)."""
        if self.weight_sync is None:
            raise RuntimeError("the rollout pool has no weight sync: call connect_weights(learner, cfg) first")
        return sync_living_workers(self.weight_sync, self, version)

    def disconnect_weights(self) -> None:
        """Release what the weight sync holds (its group, shared memory) while the actors run."""
        if self.weight_sync is not None:
            try:
                self.weight_sync.close()
            except Exception as exc:  # the actors may be gone already; say so, go on stopping
                log.warning("weight sync could not be closed (%s: %s)", type(exc).__name__, exc)
            self.weight_sync = None

    def _bring_to(self, slots: List[int], version: Optional[int]) -> None:
        """New workers in `slots` (none: workers were dropped) get weights `version` and the
        weight group is formed again; nothing to do before weights are connected."""
        if self.weight_sync is not None and version is not None:
            self.weight_sync.workers_changed(slots, version)

    # ---- generation ------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], seed: int, n: Optional[int] = None,
               greedy: bool = False) -> RolloutBatch:
        """Dispatch prompts (G samples each, or `n`; greedy decoding with `greedy`; all of a
        prompt's samples on one worker) to the least-loaded workers."""
        load = [0] * len(self.workers)
        assignment: Dict[int, List[int]] = {i: [] for i in range(len(self.workers))}
        for p in range(len(prompts)):
            w = min(range(len(self.workers)), key=lambda i: (load[i], i))
            assignment[w].append(p)
            load[w] += 1
        calls = {w: self.workers[w].generate.remote([prompts[i] for i in idx], n, worker_seed(seed, w), greedy)
                 for w, idx in assignment.items() if idx}
        return RolloutBatch([list(p) for p in prompts], seed, assignment, calls, time.perf_counter(), n=n, greedy=greedy)

    def collect(self, batch: RolloutBatch, version: Optional[int] = None) -> List[Any]:
        """Results per prompt (list of samples or PromptError), in prompt order. A dead worker
        is replaced and brought to weights `version` (the pool's weight sync; without one it
        keeps the initial policy), or, with autoscale, dropped (its node is recorded in
        `batch.lost_nodes`, the weight group formed again); either way its prompts are dispatched
        again, with the seed they had."""
        results: List[Any] = [None] * len(batch.prompts)
        pending = [PendingCall(w, batch.assignment[w], worker_seed(batch.seed, w), ref) for w, ref in batch.calls.items()]
        dead: List[int] = []
        while pending:
            call = pending.pop(0)
            try:
                out = ray.get(call.ref)
            except RayActorError as exc:
                pending.append(self._redispatch(batch, call, exc, dead, pending, version))
                continue
            for i, r in zip(call.positions, out):
                results[i] = r
        if dead:
            self.group.remove(dead)
            self._bring_to([], version)
        return results

    def _redispatch(self, batch: RolloutBatch, call: PendingCall, exc: Exception, dead: List[int],
                    pending: List[PendingCall], version: Optional[int]) -> PendingCall:
        """The dead worker's prompts, sent again: to its replacement, or (autoscale) to the living
        worker with the fewest prompts in flight."""
        w = call.worker
        report = self.group.ready_reports[w] or {}
        node, node_id = report.get("node_ip", "?"), report.get("node_id")
        gone = node_id is not None and not node_alive(node_id)
        where = f"rollout worker {w} on node {node}" + (" (the node is gone)" if gone else "")
        if self.cfg.autoscale:
            if w not in dead:
                dead.append(w)
                batch.lost_nodes.append(node)
                self.lost_count += 1
            alive = [i for i in range(len(self.workers)) if i not in dead]
            if not alive:
                raise RuntimeError(f"{where} died and no rollout worker is left: {exc}") from exc
            load = {i: sum(len(p.positions) for p in pending if p.worker == i) for i in alive}
            target = min(alive, key=lambda i: (load[i], i))
            log.warning("%s died (%s): dropping it; its %d prompts go to worker %d", where, type(exc).__name__,
                        len(call.positions), target)
        else:
            log.warning("%s died (%s): replacing it and re-dispatching %d prompts", where, type(exc).__name__,
                        len(call.positions))
            self._replace(w, where)
            self._bring_to([w], version)
            target = w
        ref = self.workers[target].generate.remote([batch.prompts[i] for i in call.positions], batch.n, call.seed,
                                                   batch.greedy)
        return PendingCall(target, call.positions, call.seed, ref)

    def check_workers(self) -> "PoolChange":
        """Probe every worker; a dead one is dropped (autoscale) or replaced in its slot
        (`sync_weights` then forms the weight group again and syncs). A probe waits until Ray
        has decided about a worker on an unreachable node."""
        dead = []
        for w, ref in enumerate(self.group.call("version")):
            try:
                ray.get(ref)
            except RayActorError:
                dead.append(w)
        nodes = [(self.group.ready_reports[w] or {}).get("node_ip", "?") for w in dead]
        if dead and self.cfg.autoscale:
            log.warning("rollout workers %s on %s are gone: dropping them, %d left", dead, nodes,
                        len(self.workers) - len(dead))
            if len(dead) == len(self.workers):
                raise RuntimeError(f"every rollout worker is gone (nodes {nodes})")
            self.group.remove(dead)
            self.lost_count += len(dead)
            return PoolChange(nodes, [])
        for w, node in zip(dead, nodes):
            log.warning("rollout worker %d on node %s is gone: replacing it", w, node)
            self._replace(w, f"rollout worker {w} on node {node}")
        return PoolChange([], dead)

    def _replace(self, slot: int, where: str) -> None:
        """A new worker in `slot`, or an error that names the lost worker and the way on."""
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"{where} died and the restart budget ({self.max_restarts}) is spent")
        try:
            self.group.replace(slot)
        except RuntimeError as start_error:
            raise RuntimeError(f"{where} died and no replacement could start ({start_error}); with "
                               "rollout.autoscale=true the run goes on with the remaining workers; "
                               "--resume continues from the last checkpoint") from None

    def room(self) -> int:
        """How many more workers the cluster's free resources fit now (autoscale), within
        `rollout.max_workers`."""
        demand = {"CPU": self.cfg.cpus_per_worker, "GPU": self.cfg.gpus_per_worker, **self.cfg.resources}
        free = ray.available_resources()
        fit = min(int(free.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0) if any(
            v > 0 for v in demand.values()) else 0
        if self.cfg.max_workers:
            fit = min(fit, self.cfg.max_workers - len(self.workers))
        return max(fit, 0)

    def grow(self, version: Optional[int] = None) -> int:
        """Start the workers that fit (autoscale) and bring them to weights `version`; returns
        how many started."""
        n = self.room()
        if n:
            before = len(self.workers)
            reports = self.group.grow(n)
            log.warning("rollout pool grew by %d workers (on %s): %d now", n,
                        sorted({r["node_ip"] for r in reports}), len(self.workers))
            self._bring_to(list(range(before, before + n)), version)
        return n

    def throughput(self) -> List[Dict[str, float]]:
        return self.group.run("throughput")

    def guidance_since_last(self) -> Dict[str, float]:
        """The classifier-free-guidance counts of the generations since the last call
        (cluster/guidance.py)."""
        return self.guidance.since_last(self.throughput)

    def worker_versions(self) -> List[Optional[int]]:
        """The policy version each worker holds (None for one that cannot be reached now)."""
        versions: List[Optional[int]] = []
        for ref in self.group.call("version"):
            try:
                versions.append(int(ray.get(ref)))
            except RayActorError:
                versions.append(None)
        return versions

    def shutdown(self) -> None:
        self.disconnect_weights()
        self.group.shutdown()
