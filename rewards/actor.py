"""Ray reward actors and the pool that feeds them.

`RewardPool` splits a batch into chunks of `batch_size`, sends them round-robin to
`num_workers` `RewardActor`s (each with `num_cpus`/`num_gpus` from config, in the IQA
environment's interpreter) and returns one result per sample, in input order. A chunk
whose actor dies (killed, crashed, OOM) or raises is retried on a freshly started actor up
to `max_retries` times; restarts and retries are counted.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rewards.config import RewardsConfig
from rewards.scoring import RewardInput, RewardResult

log = logging.getLogger(__name__)


@ray.remote
class RewardActor:
    def __init__(self, cfg: RewardsConfig, vq_dir: Optional[str]):
        import torch

        device = self._device(cfg)
        vq = None
        if vq_dir and cfg.weights.get("generation", 0.0) > 0:
            from vlcot.vq import VQTokenizer

            vq = VQTokenizer.load(vq_dir).to(device)
        from rewards.scoring import RewardScorer

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.scorer = RewardScorer(cfg, vq=vq, device=device)
        self.image_scorer = self.scorer.resources.iqa  # for score_images; built on first use when None

    @staticmethod
    def _device(cfg: RewardsConfig) -> str:
        import torch

        want = cfg.generation.device
        if want == "auto":
            return "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        return want

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        return self.scorer.score(batch, return_images=return_images)

    def score_images(self, images: List[Any], refs: Optional[List[Any]] = None) -> List[Any]:
        """IQA of plain uint8 [H, W, 3] images: (generation score, raw metric values) each."""
        if self.image_scorer is None:
            from rewards.iqa import IQAScorer

            self.image_scorer = IQAScorer(self.scorer.cfg.generation, device=self._device(self.scorer.cfg))
        return self.image_scorer.score(images, refs)

    def ready(self) -> Dict[str, Any]:
        import os
        import sys

        return {"pid": os.getpid(), "python": sys.executable, "nonfinite": self.scorer.nonfinite_count}


class RewardPool:
    def __init__(self, cfg: RewardsConfig, vq_dir: Optional[str], runtime_env: Optional[dict] = None,
                 timeout_s: float = 600.0, placement: Optional[Callable[[int], Dict[str, Any]]] = None):
        """`placement(slot)` may add Ray scheduling options (a placement-group bundle)."""
        self.cfg = cfg
        self.placement = placement
        self.vq_dir = vq_dir
        self.runtime_env = runtime_env or {}
        self.timeout_s = timeout_s
        self.restarts = 0
        self.retries = 0
        self.actors = [self._start(i) for i in range(cfg.num_workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"reward actors not ready after {timeout_s:.0f}s: each asks for num_cpus={cfg.num_cpus}, "
                f"num_gpus={cfg.num_gpus}; the cluster has {ray.available_resources()} free") from None
        except RayActorError as exc:  # its constructor raised (e.g. a reward plug-in that cannot load)
            self.shutdown()
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise RuntimeError(f"a reward actor failed to start: {lines[-1] if lines else exc}") from exc

    def _start(self, slot: int):
        extra = self.placement(slot) if self.placement else {}
        return RewardActor.options(
            num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus, runtime_env=self.runtime_env, **extra
        ).remote(self.cfg, self.vq_dir)

    def _replace(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot])
        except Exception:
            pass
        self.actors[slot] = self._start(slot)
        self.restarts += 1

    def submit(self, batch: List[RewardInput], return_images: bool = False) -> Dict[str, Any]:
        """Start scoring; returns a handle for `collect`."""
        size = self.cfg.batch_size
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        refs = []
        for k, chunk in enumerate(chunks):
            slot = k % len(self.actors)
            refs.append((slot, self.actors[slot].score.remote(chunk, return_images)))
        return {"chunks": chunks, "refs": refs, "return_images": return_images}

    def collect(self, handle: Dict[str, Any]) -> List[RewardResult]:
        out: List[RewardResult] = []
        for chunk, (slot, ref) in zip(handle["chunks"], handle["refs"]):
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
                    log.warning("reward actor %d failed (%s); restarting it and retrying %d samples",
                                slot, type(exc).__name__, len(chunk))
                    self._replace(slot)
                    ref = self.actors[slot].score.remote(chunk, handle["return_images"])
        return out

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        return self.collect(self.submit(batch, return_images))

    def score_images(self, images: List[Any], refs: Optional[List[Any]] = None) -> List[Any]:
        """IQA scores of plain images on the first actor (evaluation, benchmarks)."""
        return ray.get(self.actors[0].score_images.remote(images, refs), timeout=self.timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
