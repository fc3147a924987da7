"""The Ray reward worker: the configured rewards (rewards/plugins.py) on the actor's device,
in the IQA environment's interpreter. `cluster.reward_pool.RewardPool` starts and feeds them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import ray

from comm.nodes import role_device
from rewards.config import RewardsConfig
from rewards.iqa import IQAScorer
from rewards.scoring import RewardInput, RewardResult, RewardScorer


@ray.remote
class RewardWorker:
    def __init__(self, cfg: RewardsConfig, vq_dir: Optional[str]):
        import torch

        device = self._device(cfg)
        vq = None
        if vq_dir and cfg.weights.get("generation", 0.0) > 0:
            from vlcot.vq import VQTokenizer  # local: imports diffusers (~20 s), only for the generation reward

            vq = VQTokenizer.load(vq_dir).to(device)
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.scorer = RewardScorer(cfg, vq=vq, device=device)
        self.image_scorer = self.scorer.resources.iqa  # for score_images; built on first use when None

    @staticmethod
    def _device(cfg: RewardsConfig) -> str:
        want = cfg.generation.device
        if want == "auto":  # GPUs configured but none usable: one clear line, not a quiet CPU run
            return role_device("rewards", cfg.num_gpus)
        if want.startswith("cuda"):
            role_device("rewards", max(cfg.num_gpus, 1.0))
        return want

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        return self.scorer.score(batch, return_images=return_images)

    def score_images(self, images: List[Any], refs: Optional[List[Any]] = None) -> List[Any]:
        """IQA of plain uint8 [H, W, 3] images: (generation score, raw metric values) each."""
        if self.image_scorer is None:
            self.image_scorer = IQAScorer(self.scorer.cfg.generation, device=self._device(self.scorer.cfg))
        return self.image_scorer.score(images, refs)

    def ready(self) -> Dict[str, Any]:
        import os
        import sys

        import ray

        return {"pid": os.getpid(), "python": sys.executable, "nonfinite": self.scorer.nonfinite_count,
                "node_ip": ray.util.get_node_ip_address()}
