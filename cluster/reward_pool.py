"""The reward pool: `RewardWorker`s (rewards/worker.py) in one `ActorGroup`, fed in chunks.

`RewardPool` splits a batch into chunks of `batch_size`, sends them round-robin to
`num_workers` actors (each with `num_cpus`/`num_gpus` from config, in the IQA environment's
interpreter) and returns one result per sample, in input order. A chunk whose actor dies
(killed, crashed, OOM) or raises is retried on a freshly started actor up to `max_retries`
times; restarts and retries are counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.actor_group import ActorGroup, resource_options
from rewards.worker import RewardWorker
from rewards.config import RewardsConfig
from rewards.types import RewardInput, RewardResult

log = logging.getLogger(__name__)


@dataclass
class RewardBatch:
    """Chunks out to the reward workers, results not yet collected."""

    chunks: List[List[RewardInput]]
    refs: List[Tuple[int, Any]]  # (actor slot, in-flight object ref) per chunk
    return_images: bool


class RewardPool:
    def __init__(self, cfg: RewardsConfig, vq_dir: Optional[str], runtime_env: Optional[dict] = None,
                 timeout_s: float = 600.0, placement: Optional[Callable[[int], Dict[str, Any]]] = None,
                 ready_timeout_s: Optional[float] = None):
        """`placement(slot)` may add Ray scheduling options (a placement-group bundle);
        `timeout_s` bounds each scoring call, `ready_timeout_s` (default: the same) the start."""
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.retries = 0
        self.group = ActorGroup("reward", RewardWorker, cfg.num_workers, lambda slot: (cfg, vq_dir),
                                dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, runtime_env=runtime_env or {},
                                     **resource_options(cfg.resources)),
                                placement, ready_timeout_s=ready_timeout_s or timeout_s)

    @property
    def workers(self) -> List[Any]:
        return self.group.workers

    @property
    def restarts(self) -> int:
        return self.group.restarts

    def submit(self, batch: List[RewardInput], return_images: bool = False) -> RewardBatch:
        """Start scoring; `collect` waits for the results."""
        size = self.cfg.batch_size
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        refs = []
        for k, chunk in enumerate(chunks):
            slot = k % len(self.workers)
            refs.append((slot, self.workers[slot].score.remote(chunk, return_images)))
        return RewardBatch(chunks, refs, return_images)

    def collect(self, batch: RewardBatch) -> List[RewardResult]:
        out: List[RewardResult] = []
        for chunk, (slot, ref) in zip(batch.chunks, batch.refs):
            attempt = 0
            while True:
                try:
                    out += ray.get(ref, timeout=self.timeout_s)
                    break
                except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                    if attempt >= self.cfg.max_retries:
                        raise RuntimeError(
                            f"reward chunk of {len(chunk)} samples failed {attempt + 1} times; last error: {exc}"
                        ) from exc
                    attempt += 1
                    self.retries += 1
                    log.warning("reward worker %d failed (%s); restarting it and retrying %d samples",
                                slot, type(exc).__name__, len(chunk))
                    self.group.replace(slot)
                    ref = self.workers[slot].score.remote(chunk, batch.return_images)
        return out

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        return self.collect(self.submit(batch, return_images))

    def score_images(self, images: List[Any], refs: Optional[List[Any]] = None) -> List[Any]:
        """IQA scores of plain images on the first actor (evaluation, benchmarks)."""
        return ray.get(self.workers[0].score_images.remote(images, refs), timeout=self.timeout_s)

    def shutdown(self) -> None:
        self.group.shutdown()
