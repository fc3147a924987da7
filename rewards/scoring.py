"""Scoring a batch: the four rewards, their weighted total, and non-finite bookkeeping.

Where image tokens become pixels: here, once per sample, in the reward actor. Rollout
workers ship parsed traces (VQ codes: a 512-px final image is 4,096 int codes, 16 KB as
int32) instead of pixels (768 KB), the VQ decoder runs next to the IQA networks (on the
reward actor's GPU on clusters, off the rollout GPUs that bound RL throughput), and the
decoded images come back only when asked for (`return_images`, for logging grids).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from rewards.config import RewardsConfig
from rewards.text import degradation_reward, format_reward, understanding_reward
from vlcot.trace import ParsedTrace

log = logging.getLogger(__name__)
COMPONENTS = ("format", "degradation", "understanding", "generation")


@dataclass
class RewardInput:
    """One generated sample and its references."""

    sample_id: str
    parsed: ParsedTrace
    labels: List[str]  # the five degradation words of the LR image
    tags: List[str]  # reference object tags
    hr_path: Optional[str] = None  # for the optional fidelity term


@dataclass
class RewardResult:
    sample_id: str
    total: float
    components: Dict[str, float]
    details: Dict[str, Any] = field(default_factory=dict)
    nonfinite: List[str] = field(default_factory=list)  # components that were NaN/inf and replaced
    final_image: Optional[np.ndarray] = None  # uint8 [H, W, 3] when requested


class RewardScorer:
    """All four rewards for a batch. `vq` decodes image codes (a `vlcot.vq.VQTokenizer`);
    without it (or with generation weight 0) the generation reward is not computed."""

    def __init__(self, cfg: RewardsConfig, vq=None, device: str = "cpu", iqa=None, matcher=None):
        self.cfg = cfg
        self.vq = vq
        self.iqa = iqa
        if self.iqa is None and vq is not None and cfg.weights.generation > 0:
            from rewards.iqa import IQAScorer

            self.iqa = IQAScorer(cfg.generation, device=device)
        self.matcher = matcher
        if self.matcher is None and cfg.understanding_mode == "semantic":
            from rewards.semantic import SemanticMatcher

            self.matcher = SemanticMatcher(cfg.semantic_threshold, device=device)
        self.nonfinite_count = 0

    def _decode(self, codes: List[np.ndarray]) -> List[np.ndarray]:
        """[h, w] code grids -> uint8 images. One sample per decoder call on purpose: batched
        convolutions differ in the last float bits, which can flip a rounded pixel, and a
        sample's reward must not depend on its batch-mates. (The IQA networks, whose
        outputs are batch-invariant, stay batched.)"""
        import torch

        out = []
        for c in codes:
            pixels = self.vq.decode(torch.as_tensor(c)[None])[0]
            out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        return out

    def _generation(self, batch: List[RewardInput]):
        n = len(batch)
        scores: List[float] = [0.0] * n
        details: List[Dict[str, Any]] = [{} for _ in range(n)]
        images: List[Optional[np.ndarray]] = [None] * n
        if self.iqa is None or self.vq is None:
            for d in details:
                d["skipped"] = "no VQ decoder or generation weight 0"
            return scores, details, images
        valid = []
        for i, s in enumerate(batch):
            st = s.parsed.stages.get("final_image")
            if st is not None and st.valid and st.codes is not None:
                valid.append(i)
            else:
                details[i]["invalid"] = st.reason if st is not None else "missing"
        if valid:
            decoded = self._decode([batch[i].parsed.stages["final_image"].codes for i in valid])
            refs = None
            if self.cfg.generation.fidelity.metric:
                refs = [_load_rgb(batch[i].hr_path) for i in valid]
            for i, img, (score, raw) in zip(valid, decoded, self.iqa.score(decoded, refs)):
                scores[i], details[i], images[i] = score, raw, img
        return scores, details, images

    def score(self, batch: List[RewardInput], return_images: bool = False) -> List[RewardResult]:
        cfg = self.cfg
        gen_scores, gen_details, images = self._generation(batch)
        results = []
        for s, g, gd, img in zip(batch, gen_scores, gen_details, images):
            comps: Dict[str, float] = {}
            details: Dict[str, Any] = {}
            for name, fn in (
                ("format", lambda: format_reward(s.parsed, shaped=cfg.format_shaped)),
                ("degradation", lambda: degradation_reward(s.parsed, s.labels, ordinal=cfg.degradation_ordinal)),
                ("understanding", lambda: understanding_reward(s.parsed, s.tags, self.matcher)),
                ("generation", lambda: (g, gd)),
            ):
                try:
                    comps[name], details[name] = fn()
                except Exception as exc:  # a reward bug must not take the batch down: counted as non-finite
                    log.exception("reward %s failed on sample %s", name, s.sample_id)
                    comps[name], details[name] = float("nan"), {"error": f"{type(exc).__name__}: {exc}"}
            bad = [k for k, v in comps.items() if not math.isfinite(v)]
            for k in bad:
                comps[k] = cfg.nonfinite_value
            if bad:
                self.nonfinite_count += len(bad)
                log.warning("sample %s: non-finite %s replaced by %s", s.sample_id, bad, cfg.nonfinite_value)
            total = sum(getattr(cfg.weights, k) * comps[k] for k in COMPONENTS)
            results.append(RewardResult(s.sample_id, float(total), comps, details, bad, img if return_images else None))
        return results


def _load_rgb(path: Optional[str]) -> Optional[np.ndarray]:
    if not path:
        return None
    from vlcot.images import open_image

    img, _, _ = open_image(path)
    return None if img is None else np.asarray(img)
