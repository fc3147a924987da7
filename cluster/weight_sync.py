"""Weight sync: moving the learner's weights into every rollout worker, as its own component.

The rollout pool owns its weight sync (`RolloutPool.connect_weights`): the driver makes one
call, `rollout.sync_weights(version)`, after each learner step, and the pool itself brings a
replaced, added or dropped worker up to date (`workers_changed`).
Transports are registered by name and chosen with `trainer.weight_sync`:

- `network` (default): a process group of its own (gloo on CPU, NCCL on GPUs) with learner
  rank 0 as the sender, hosted at rank 0's node address; bucketed broadcast, streamed into
  each engine bucket by bucket (comm/transport.py). On CPU, workers on rank 0's own node
  read the weights from one shared-memory file instead (`trainer.weight_sync_shm`,
  comm/shm_weights.py), written in the same parameter walk. A replaced, added or lost
  worker cannot join or leave a formed group, so the group is formed again.
- `filesystem`: learner rank 0 writes the weights as an HF safetensors folder (streamed shard
  by shard) into `trainer.weight_sync_dir` and every worker reloads from it. No process group:
  it suits nodes that share a filesystem but cannot open ports to each other, and a replaced
  worker only reloads.

A same-GPU CUDA-IPC transport (as OpenRLHF and verl have for colocated engines) would be the
GPU counterpart of the shared-memory path; it is not implemented: roles sharing a GPU use `filesystem` (config validation
refuses them with `network`, whose NCCL group cannot hold two ranks on one GPU). Pointing
`weight_sync_dir` at /dev/shm makes `filesystem` a shared-memory transport on one node.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import ray

from comm.shm_weights import shm_dir
from comm.transport import WeightTransport
from vlcot.registry import Registry

log = logging.getLogger(__name__)

WEIGHT_SYNCS: Registry[type] = Registry("weight sync")


class WeightSync(ABC):
    def __init__(self, learner, rollout, cfg):
        """`learner`: the LearnerGroup; `rollout`: the rollout pool's ActorGroup; `cfg`: the run's Config."""
        self.learner, self.rollout, self.cfg = learner, rollout, cfg

    def connect(self) -> None:
        """Prepare the transport (called once after the actors are up)."""

    def close(self) -> None:
        """Release what the transport holds (shared memory, groups) while the actors still run."""

    @abstractmethod
    def sync(self, version: int) -> Dict[str, float]:
        """Every worker holds the learner's current weights, stamped `version`; returns stats."""

    @abstractmethod
    def workers_changed(self, added: List[int], version: int) -> None:
        """The pool replaced or added workers (in slots `added`, holding the initial policy) or
        dropped dead ones (`added` empty): bring the new ones to `version`, ready for the next
        sync."""


@WEIGHT_SYNCS.register("network")
class NetworkSync(WeightSync):
    def __init__(self, learner, rollout, cfg):
        super().__init__(learner, rollout, cfg)
        self.folder = str(shm_dir(f"{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        self.local: List[int] = []  # worker slots that read the shared-memory file
        self.remote: List[int] = []  # worker slots in the network group

    def connect(self) -> None:
        """Split the workers into those on learner rank 0's node (shared memory, CPU only) and
        the rest, and form the broadcast group {learner rank 0, the rest} (all must join
        concurrently), hosted at rank 0's node address on a port free there."""
        backend = "nccl" if self.cfg.rollout.gpus_per_worker > 0 else "gloo"
        lead = self.learner.places[0]
        same_node = self.cfg.trainer.weight_sync_shm and backend == "gloo"
        self.local = [i for i, r in enumerate(self.rollout.ready_reports) if same_node and r["node_id"] == lead.node_id]
        self.remote = [i for i in range(len(self.rollout)) if i not in self.local]
        make, refs = None, []
        if self.remote:
            port, world, timeout = self.learner.open_port(), len(self.remote) + 1, self.cfg.trainer.weight_sync_timeout_s

            def member(rank: int):
                return functools.partial(WeightTransport, lead.ip, port, rank, world, backend, timeout)

            make = member(0)
            refs = [self.rollout.workers[w].join_weight_group.remote(member(k + 1)) for k, w in enumerate(self.remote)]
        ray.get(self.learner.join_weight_group(make, self.folder if self.local else None) + refs)

    def sync(self, version: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        receives = [self.rollout.workers[w].receive_weights.remote() for w in self.remote]
        stats = dict(ray.get(self.learner.broadcast_async(version))[0])
        reads = [self.rollout.workers[w].read_shared_weights.remote(self.folder, version) for w in self.local]
        ray.get(receives + reads)
        stats.update({"timing/sync_s": time.perf_counter() - t0, "sync/network_workers": float(len(self.remote)),
                      "sync/shm_workers": float(len(self.local))})
        return stats

    def close(self) -> None:
        self.learner.leave_weight_group()

    def workers_changed(self, added: List[int], version: int) -> None:
        """A formed group cannot take or lose a member: it is formed again over the workers there
        are now; new workers get the weights by one broadcast to all (the others load the same
        weights again)."""
        self.connect()
        if added:
            self.sync(version)


@WEIGHT_SYNCS.register("filesystem")
class FilesystemSync(WeightSync):
    def __init__(self, learner, rollout, cfg):
        super().__init__(learner, rollout, cfg)
        root = Path(cfg.trainer.weight_sync_dir or Path(cfg.run_dir) / "weight_sync")
        self.folder = root / "policy"
        self.version = None  # the version the folder holds

    def sync(self, version: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        self.learner.save_policy(str(self.folder))
        self.version = version
        written = time.perf_counter()
        ray.get(self.rollout.call("update_weights_from_path", str(self.folder), version))
        nbytes = sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
                "sync/write_s": written - t0, "timing/sync_s": seconds}

    def workers_changed(self, added: List[int], version: int) -> None:
        """New workers reload from the folder (dropped ones need nothing: there is no group)."""
        if self.version is None:  # nothing synced yet: the new workers already hold the initial policy
            return
        ray.get([self.rollout.workers[slot].update_weights_from_path.remote(str(self.folder), self.version)
                 for slot in added])


@dataclass
class SyncReport:
    """One weight sync: the transport's statistics and the nodes of the workers dropped on the way."""

    stats: Dict[str, float]
    lost_nodes: List[str] = field(default_factory=list)


def sync_living_workers(weight_sync: WeightSync, pool: Any, version: int) -> SyncReport:
    """Bring every living rollout worker of `pool` to `version` (`pool.check_workers()` is the
    RolloutPool's probe: it drops or replaces dead workers and says which).

    A worker that died since it last answered is dropped (autoscale) or replaced before the
    sync, and the group is formed again. A node can also go down during the sync itself (the
    probe found it alive a moment before): the sync then fails, the pool is probed again and,
    if a worker is gone, the sync is done again over the workers there are now. A failure
    with every worker still answering is not a lost worker and is raised as it is. Each
    retry needs a worker fewer or a replacement from the restart budget, so this ends.
    """
    lost_nodes: List[str] = []
    change = pool.check_workers()
    while True:
        if change:
            lost_nodes += change.lost_nodes
            weight_sync.workers_changed([], version)
        try:
            return SyncReport(weight_sync.sync(version), lost_nodes)
        except Exception as exc:
            change = pool.check_workers()
            if not change:
                raise
            log.warning("the weight sync to version %d failed (%s: %s) as rollout workers went away (lost on %s, "
                        "replaced in slots %s): syncing again over the workers that are left", version,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", change.lost_nodes or "-",
                        change.replaced or "-")
