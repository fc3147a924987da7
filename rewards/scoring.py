"""Scoring a batch: every reward named in `rewards.weights` (rewards/plugins.py), their
weighted total, and non-finite bookkeeping.

Where image tokens become pixels: in the `generation` reward, once per sample, in the reward
actor. Rollout workers ship parsed traces (VQ codes: a 512-px final image is 4,096 int codes,
16 KB as int32) instead of pixels (768 KB), the VQ decoder runs next to the IQA networks (on
the reward worker's GPU on clusters, off the rollout GPUs that bound RL throughput), and the
decoded images come back only when asked for (`return_images`, for logging grids).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List

from rewards.config import RewardsConfig
from rewards.iqa import IQAScorer
from rewards.plugins import RewardResources, build_rewards, run_reward
from rewards.semantic import SemanticMatcher
from rewards.types import RewardInput, RewardResult

log = logging.getLogger(__name__)
__all__ = ["RewardInput", "RewardResult", "RewardScorer"]


class RewardScorer:
    """The configured rewards for a batch. `vq` decodes image codes (a `vlcot.vq.VQTokenizer`);
    without it (or with generation weight 0) the generation reward is not computed."""

    def __init__(self, cfg: RewardsConfig, vq=None, device: str = "cpu", iqa=None, matcher=None):
        self.cfg = cfg
        if iqa is None and vq is not None and cfg.weights.get("generation", 0.0) > 0:
            iqa = IQAScorer(cfg.generation, device=device)
        if matcher is None and cfg.understanding_mode == "semantic" and "understanding" in cfg.weights:
            matcher = SemanticMatcher(cfg.semantic_threshold, device=device)
        self.resources = RewardResources(cfg, vq=vq, iqa=iqa, matcher=matcher)
        self.rewards = build_rewards(cfg, self.resources)
        self.nonfinite_count = 0

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        outputs = {r.name: run_reward(r, batch) for r in self.rewards}
        results = []
        for i, s in enumerate(batch):
            comps: Dict[str, float] = {name: out[i].score for name, out in outputs.items()}
            details: Dict[str, Any] = {name: out[i].details for name, out in outputs.items()}
            bad = [k for k, v in comps.items() if not math.isfinite(v)]
            for k in bad:
                comps[k] = self.cfg.nonfinite_value
            if bad:
                self.nonfinite_count += len(bad)
                log.warning("sample %s: non-finite %s replaced by %s", s.sample_id, bad, self.cfg.nonfinite_value)
            total = sum(r.weight * comps[r.name] for r in self.rewards)
            image = next((out[i].image for out in outputs.values() if out[i].image is not None), None)
            results.append(RewardResult(s.sample_id, float(total), comps, details, bad, image if return_images else None))
        return results
