"""A learner rank as a Ray worker (`LearnerWorker`), set up like a torchrun rank around
`LearnerEngine`.

The wiring code (`cluster.learner_group.LearnerGroup`) starts N of them, asks each where it
landed (`place`), hands each its torchrun environment (`setup`: the rendezvous at rank 0's node
address, local rank and visible GPUs per node), shards batches over them and calls engine
methods on every rank through `call`. Weight broadcast: all ranks walk
the full parameters (ZeRO-3 gathers are collective) and rank 0 streams them through a
transport the caller provides (`comm.transport.WeightTransport` via a factory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import ray

from comm.nodes import NodePlace, RankEnvironment, gloo_interface, here
from comm.shm_weights import SharedMemoryWeightWriter, remove_orphans
from comm.transport import free_port
from learner.config import LearnerConfig


@ray.remote
class LearnerWorker:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, rank: int):
        self.cfg, self.policy_dir, self.rank = cfg, policy_dir, rank
        self.engine = None
        self.transport = None
        self.shm = None  # rank 0: the same-node shared-memory weights writer
        self.synced_full = False  # whether the current group already has the frozen tensors
        self.place = here()

    def where(self) -> NodePlace:
        return self.place

    def open_port(self) -> int:
        """A port free on this rank's node (rank 0 hosts the rendezvous and the weight group)."""
        return free_port(self.place.ip)

    def setup(self, env: RankEnvironment) -> Dict[str, Any]:
        """Start the engine as rank `env.rank`: torch.distributed reads the environment set here."""
        if env.rank != self.rank:
            raise ValueError(f"rank {self.rank} was handed the environment of rank {env.rank}")
        os.environ.update(env.variables())
        os.environ.update(gloo_interface(self.place.ip))
        import torch

        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        from learner.engine import LearnerEngine  # local: the model stack (transformers) loads in the actor, not the driver

        self.engine = LearnerEngine(self.cfg, self.policy_dir)
        return {"rank": self.rank, "device": str(self.engine.device), "dtype": str(self.engine.dtype),
                "node_ip": self.place.ip, "shared_prompt": self.engine.shared_prompt, "local_rank": env.local_rank, "master": f"{env.master_addr}:{env.master_port}"}

    def call(self, method: str, *args) -> Any:
        """Run a `LearnerEngine` method on this rank (grpo_step, sft_step, set_lr, param_digest,
        save, load, save_policy, set_reference, ...): the group calls it on every rank."""
        return getattr(self.engine, method)(*args)

    def full_state_dict(self) -> Optional[Dict[str, Any]]:
        sd = self.engine.full_state_dict()
        return {k: v.numpy() for k, v in sd.items()} if self.rank == 0 else None

    def join_weight_group(self, make_transport: Optional[Callable[..., Any]], shm_folder: Optional[str] = None) -> bool:
        """Rank 0 joins the learner -> rollout broadcast group (blocks until all members join;
        `make_transport` None: no worker on another node) and, with `shm_folder`, writes the
        weights there too for the workers on its own node."""
        self.synced_full = False
        if self.rank != 0:
            return True
        self.leave_weight_group()
        if make_transport is not None:
            self.transport = make_transport(local_host=self.place.ip)
        if shm_folder:
            remove_orphans(Path(shm_folder).parent)  # left by runs killed before they could clean up
            self.shm = SharedMemoryWeightWriter(shm_folder)
        return True

    def leave_weight_group(self) -> bool:
        """Drop the group and delete the shared-memory weights."""
        self.transport = None
        if self.shm is not None:
            self.shm.remove()
        self.shm = None
        return True

    def broadcast(self, version: int) -> Dict[str, float]:
        """Stream the full weights, stamped `version`, to the broadcast group and the same-node
        file (rank 0 sends; other ranks take part in the gathers only). The first broadcast
        to a newly formed group carries every tensor, later ones only the trainable ones (the
        frozen ones cannot have changed). Every rank is called for every broadcast, so all
        ranks agree on which walk it is."""
        self.engine.version = version
        trainable_only = self.synced_full
        self.synced_full = True
        metas = self.engine.param_metas(trainable_only)
        tensors = (t for _, t in self.engine.iter_full_params(trainable_only))
        if self.rank != 0:
            for _ in tensors:
                pass
            return {}
        shm = self.shm
        passing = shm.tee(metas, tensors, version) if shm is not None else tensors
        stats = {}
        try:
            if self.transport is not None:
                sent = self.transport.send(metas, passing, version, bucket_bytes=self.cfg.bucket_mb << 20)
                stats = {"sync/seconds": sent.seconds, "sync/bytes": float(sent.bytes), "sync/gb_per_s": sent.gb_per_s,
                         "sync/buckets": float(sent.buckets)}
        finally:
            for _ in passing:  # the rest (all of it without a group); the other ranks' ZeRO-3 gathers need rank 0
                pass
        if shm is not None:
            written = shm.commit()
            stats.update({"sync/shm_seconds": written.seconds, "sync/shm_gb_per_s": written.gb_per_s})
            stats.setdefault("sync/bytes", float(written.bytes))
        return stats
