"""The learner group: N Ray actors set up like torchrun ranks around `LearnerEngine`.

`LearnerGroup` shards each batch over the ranks (sample i goes to rank i % N, so every
rank gets the same count), runs the step on all of them and returns rank 0's metrics
(already reduced over ranks). Weight broadcast: all ranks walk the full parameters
(ZeRO-3 gathers are collective) and rank 0 streams them through a transport the caller
provides (`cluster.transport.WeightTransport` via a factory) to the rollout workers.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import ray

from learner.config import LearnerConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote
class LearnerActor:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, rank: int, world: int, master_port: int):
        os.environ.update({
            "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
        })
        self.cfg, self.policy_dir, self.rank = cfg, policy_dir, rank
        self.engine = None
        self.transport = None

    def setup(self) -> Dict[str, Any]:
        import torch

        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        from learner.engine import LearnerEngine

        self.engine = LearnerEngine(self.cfg, self.policy_dir)
        return {"rank": self.rank, "device": str(self.engine.device), "dtype": str(self.engine.dtype)}

    def grpo_step(self, shard: Dict[str, np.ndarray]) -> Dict[str, float]:
        return self.engine.grpo_step(shard)

    def sft_step(self, shard: Dict[str, np.ndarray]) -> Dict[str, float]:
        return self.engine.sft_step(shard)

    def set_lr(self, lr: float) -> None:
        self.engine.set_lr(lr)

    def param_digest(self) -> str:
        return self.engine.param_digest()

    def full_state_dict(self) -> Optional[Dict[str, Any]]:
        sd = self.engine.full_state_dict()
        return {k: v.numpy() for k, v in sd.items()} if self.rank == 0 else None

    def param_metas(self):
        return self.engine.param_metas()

    def join_weight_group(self, make_transport: Optional[Callable[[], Any]]) -> bool:
        """Rank 0 joins the learner -> rollout broadcast group (blocks until all members join)."""
        if self.rank == 0 and make_transport is not None:
            self.transport = make_transport()
        return True

    def broadcast(self, version: int) -> Dict[str, float]:
        """Stream the full weights, stamped `version`, to the broadcast group (rank 0 sends;
        other ranks take part in the gathers only)."""
        self.engine.version = version
        metas = self.engine.param_metas()
        tensors = (t for _, t in self.engine.iter_full_params())
        if self.rank == 0 and self.transport is not None:
            stats = self.transport.send(metas, tensors, version, bucket_bytes=self.cfg.bucket_mb << 20)
            return {"sync/seconds": stats.seconds, "sync/bytes": float(stats.bytes), "sync/gb_per_s": stats.gb_per_s,
                    "sync/buckets": float(stats.buckets)}
        for _ in tensors:
            pass
        return {}

    def save(self, path: str, extra_state: Optional[Dict[str, Any]] = None) -> None:
        self.engine.save(path, extra_state)

    def load(self, path: str) -> Dict[str, Any]:
        return self.engine.load(path)

    def save_policy(self, path: str) -> None:
        self.engine.save_policy(path)

    def set_reference(self, hf_dir: str) -> bool:
        return self.engine.set_reference(hf_dir)


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, runtime_env: Optional[dict] = None,
                 placement: Optional[Callable[[int], Dict[str, Any]]] = None):
        """`placement(rank)` may add Ray scheduling options (a placement-group bundle)."""
        self.cfg = cfg
        port = _free_port()
        opts = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        if runtime_env:
            opts["runtime_env"] = runtime_env
        self.actors = [LearnerActor.options(**opts, **(placement(r) if placement else {}))
                       .remote(cfg, policy_dir, r, cfg.num_workers, port) for r in range(cfg.num_workers)]
        self.info = ray.get([a.setup.remote() for a in self.actors])

    @property
    def world(self) -> int:
        return len(self.actors)

    def shard(self, batch: Dict[str, np.ndarray]) -> List[Dict[str, np.ndarray]]:
        n = len(batch["input_ids"])
        if n % self.world:
            raise ValueError(f"batch of {n} samples does not split over {self.world} learner ranks")
        return [{k: np.ascontiguousarray(v[r::self.world]) for k, v in batch.items()} for r in range(self.world)]

    def _all(self, method: str, *args) -> List[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def grpo_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        return ray.get([a.grpo_step.remote(s) for a, s in zip(self.actors, self.shard(batch))])[0]

    def sft_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        return ray.get([a.sft_step.remote(s) for a, s in zip(self.actors, self.shard(batch))])[0]

    def set_lr(self, lr: float) -> None:
        self._all("set_lr", lr)

    def param_digests(self) -> List[str]:
        return self._all("param_digest")

    def full_state_dict(self) -> Dict[str, np.ndarray]:
        return self._all("full_state_dict")[0]

    def join_weight_group(self, make_transport: Callable[[], Any]) -> List[Any]:
        """Returns the object refs (do not wait: the receivers must join concurrently)."""
        return [a.join_weight_group.remote(make_transport if r == 0 else None) for r, a in enumerate(self.actors)]

    def broadcast_async(self, version: int) -> List[Any]:
        return [a.broadcast.remote(version) for a in self.actors]

    def save(self, path: str, extra_state: Optional[Dict[str, Any]] = None) -> None:
        self._all("save", path, extra_state)

    def load(self, path: str) -> Dict[str, Any]:
        return self._all("load", path)[0]

    def save_policy(self, path: str) -> None:
        """The current weights as an HF policy folder."""
        self._all("save_policy", path)

    def set_reference(self, hf_dir: str) -> bool:
        """Rebuild the KL reference of every rank from the HF policy folder `hf_dir`."""
        return self._all("set_reference", hf_dir)[0]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
