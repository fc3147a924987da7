"""The learner group: N `LearnerWorker` ranks (learner/worker.py) in one `ActorGroup`.

It shards each batch over the ranks, every rank the same count: a GRPO batch under the
shared-prompt pass by the plan of learner/packing.py (a prompt's samples in one pack on one rank),
any other batch sample i to rank i % N. It runs the step on all of them and returns rank 0's metrics (already reduced over
ranks). Every other call runs a `LearnerEngine` method on all ranks (ZeRO-3 gathers and
DeepSpeed checkpoints are collective).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import ray

from cluster.actor_group import ActorGroup, resource_options
from comm.nodes import rank_environments
from learner.worker import LearnerWorker
from learner.config import LearnerConfig
from learner.packing import plan_packs


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, runtime_env: Optional[dict] = None,
                 placement: Optional[Callable[[int], Dict[str, Any]]] = None, ready_timeout_s: float = 600.0):
        """`placement(rank)` may add Ray scheduling options (a placement-group bundle). The ranks
        report where they landed, rank 0 opens a port on its node, and every rank starts its
        engine with its torchrun environment (`self.environments`); `self.setup_reports` holds each
        rank's setup report (rank, device, dtype, node address, local rank, rendezvous)."""
        self.cfg = cfg
        options = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **resource_options(cfg.resources))
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.group = ActorGroup("learner", LearnerWorker, cfg.num_workers, lambda rank: (cfg, policy_dir, rank),
                                options, placement, ready="where", ready_timeout_s=ready_timeout_s)
        self.places = self.group.ready_reports
        port = ray.get(self.group.workers[0].open_port.remote())
        self.environments = rank_environments(self.places, port)
        self.setup_reports = self.group.run("setup", shards=self.environments)
        self.shared_prompt = bool(self.setup_reports[0]["shared_prompt"])  # resolved by the engines

    @property
    def world(self) -> int:
        return len(self.group)

    @property
    def workers(self) -> List[Any]:
        return self.group.workers

    def split(self, batch: Dict[str, np.ndarray], packed: bool = False) -> Tuple[List[np.ndarray], List[Dict[str, np.ndarray]]]:
        """Each rank's rows of `batch` and its shard. `packed` (a GRPO batch): under the shared-prompt
        pass the rows follow the pack plan and each shard says which pack each row is in (`pack`)."""
        n = len(batch["input_ids"])
        if n % self.world:
            raise ValueError(f"batch of {n} samples does not split over {self.world} learner ranks")
        if not (packed and self.shared_prompt):
            ranks = [np.arange(r, n, self.world) for r in range(self.world)]
            return ranks, [{k: np.ascontiguousarray(v[rows]) for k, v in batch.items()} for rows in ranks]
        plans = plan_packs(batch["input_ids"], batch["attention_mask"], batch["prompt_len"], self.world,
                           self.cfg.pack_max_tokens)
        shards = [dict({k: np.ascontiguousarray(v[p.rows]) for k, v in batch.items()}, pack=p.pack) for p in plans]
        return [p.rows for p in plans], shards

    def shard(self, batch: Dict[str, np.ndarray], packed: bool = False) -> List[Dict[str, np.ndarray]]:
        return self.split(batch, packed)[1]

    def _on_all(self, method: str, *args) -> List[Any]:
        """`LearnerEngine.method(*args)` on every rank; their results in rank order."""
        return self.group.run("call", method, *args)

    def grpo_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        return self.group.run("call", "grpo_step", shards=self.shard(batch, packed=True))[0]

    def sft_step(self, batch: Dict[str, np.ndarray]) -> Dict[str, float]:
        return self.group.run("call", "sft_step", shards=self.shard(batch))[0]

    def logprobs(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """The learner's log-probs of every target of `batch` [n, L-1], rows in batch order."""
        ranks, shards = self.split(batch, packed=True)
        parts = self.group.run("call", "logprobs", shards=shards)
        out = np.zeros(batch["loss_mask"].shape, dtype=np.float32)
        for rows, part in zip(ranks, parts):
            out[rows] = part
        return out

    def set_lr(self, lr: float) -> None:
        self._on_all("set_lr", lr)

    def param_digests(self) -> List[str]:
        return self._on_all("param_digest")

    def full_state_dict(self) -> Dict[str, np.ndarray]:
        return self.group.run("full_state_dict")[0]

    def open_port(self) -> int:
        """A port free on rank 0's node right now (for a group rank 0 hosts)."""
        return ray.get(self.workers[0].open_port.remote())

    def join_weight_group(self, make_transport: Optional[Callable[..., Any]], shm_folder: Optional[str] = None) -> List[Any]:
        """Returns the object refs (do not wait: the receivers must join concurrently)."""
        return [a.join_weight_group.remote(make_transport if r == 0 else None, shm_folder if r == 0 else None)
                for r, a in enumerate(self.workers)]

    def leave_weight_group(self) -> None:
        ray.get(self.workers[0].leave_weight_group.remote())

    def broadcast_async(self, version: int) -> List[Any]:
        return self.group.call("broadcast", version)

    def save(self, path: str, extra_state: Optional[Dict[str, Any]] = None) -> None:
        self._on_all("save", path, extra_state)

    def load(self, path: str) -> Dict[str, Any]:
        return self._on_all("load", path)[0]

    def save_policy(self, path: str) -> None:
        """The current weights as an HF policy folder."""
        self._on_all("save_policy", path)

    def set_reference(self, hf_dir: str) -> bool:
        """Rebuild the KL reference of every rank from the HF policy folder `hf_dir`."""
        return self._on_all("set_reference", hf_dir)[0]

    def shutdown(self) -> None:
        self.group.shutdown()
