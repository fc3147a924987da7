"""Weight sync: moving the learner's weights into every rollout worker, as its own component.

The driver calls `sync(version)` after each learner step; the rollout pool calls
`worker_replaced(slot, version)` after it restarts a dead worker. Transports are registered
by name and chosen with `trainer.weight_sync`:

- `network` (default): a process group of its own (gloo on CPU, NCCL on GPUs) with learner
  rank 0 as the sender; bucketed broadcast, streamed into each engine bucket by bucket
  (cluster/transport.py). A replaced worker cannot join a formed group, so the group is
  rebuilt and resynced.
- `filesystem`: learner rank 0 writes the weights as an HF safetensors folder (streamed shard
  by shard) into `trainer.weight_sync_dir` and every worker reloads from it. No process group:
  it suits nodes that share a filesystem but cannot open ports to each other, and a replaced
  worker only reloads.

A same-GPU CUDA-IPC transport (as OpenRLHF and verl have for colocated engines) would register
here too; it is not implemented: roles sharing a GPU use `filesystem` (config validation
refuses them with `network`, whose NCCL group cannot hold two ranks on one GPU). Pointing
`weight_sync_dir` at /dev/shm makes `filesystem` a shared-memory transport on one node.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, List

import ray

from cluster.transport import WeightTransport
from vlcot.registry import Registry

WEIGHT_SYNCS: Registry[type] = Registry("weight sync")


class WeightSync(ABC):
    def __init__(self, learner, workers, cfg):
        """`learner`: the LearnerGroup; `workers`: the rollout pool's ActorGroup; `cfg`: the run's Config."""
        self.learner, self.workers, self.cfg = learner, workers, cfg

    def connect(self) -> None:
        """Prepare the transport (called once after the actors are up)."""

    @abstractmethod
    def sync(self, version: int) -> Dict[str, float]:
        """Every worker holds the learner's current weights, stamped `version`; returns stats."""

    @abstractmethod
    def worker_replaced(self, slot: int, version: int) -> None:
        """A new worker in `slot` started from the initial policy: bring it to `version`."""

    @abstractmethod
    def workers_changed(self, added: List[int], version: int) -> None:
        """The pool grew (new workers in slots `added`, holding the initial policy) or dropped
        dead workers (`added` empty): bring the new ones to `version`, ready for the next sync."""


@WEIGHT_SYNCS.register("network")
class NetworkSync(WeightSync):
    def connect(self) -> None:
        """Form the broadcast group {learner rank 0, every worker} (all must join concurrently),
        hosted at learner rank 0's node address on a port free there."""
        backend = "nccl" if self.cfg.rollout.gpus_per_worker > 0 else "gloo"
        host, port = self.learner.places[0].ip, self.learner.open_port()
        world, timeout = len(self.workers) + 1, self.cfg.trainer.weight_sync_timeout_s

        def member(rank: int):
            return functools.partial(WeightTransport, host, port, rank, world, backend, timeout)

        refs = self.learner.join_weight_group(member(0))
        refs += [w.join_weight_group.remote(member(i + 1)) for i, w in enumerate(self.workers.actors)]
        ray.get(refs)

    def sync(self, version: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        receives = self.workers.call("receive_weights")
        stats = dict(ray.get(self.learner.broadcast_async(version))[0])
        ray.get(receives)
        stats["timing/sync_s"] = time.perf_counter() - t0
        return stats

    def worker_replaced(self, slot: int, version: int) -> None:
        self.connect()
        self.sync(version)

    def workers_changed(self, added: List[int], version: int) -> None:
        """A formed group cannot take or lose a member: it is formed again over the workers there
        are now; new workers get the weights by one broadcast to all (the others load the same
        weights again)."""
        self.connect()
        if added:
            self.sync(version)


@WEIGHT_SYNCS.register("filesystem")
class FilesystemSync(WeightSync):
    def __init__(self, learner, workers, cfg):
        super().__init__(learner, workers, cfg)
        root = Path(cfg.trainer.weight_sync_dir or Path(cfg.run_dir) / "weight_sync")
        self.folder = root / "policy"
        self.version = None  # the version the folder holds

    def sync(self, version: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        self.learner.save_policy(str(self.folder))
        self.version = version
        written = time.perf_counter()
        ray.get(self.workers.call("update_weights_from_path", str(self.folder), version))
        nbytes = sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
                "sync/write_s": written - t0, "timing/sync_s": seconds}

    def worker_replaced(self, slot: int, version: int) -> None:
        if self.version is None:  # nothing synced yet: the new worker already holds the initial policy
            return
        ray.get(self.workers.actors[slot].update_weights_from_path.remote(str(self.folder), self.version))

    def workers_changed(self, added: List[int], version: int) -> None:
        for slot in added:
            self.worker_replaced(slot, version)
