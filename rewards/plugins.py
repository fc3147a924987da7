"""Rewards as named, batched plug-ins.

A reward is a function over a batch of `RewardInput`s that returns, per sample, a score and
optional details: a float, a `(score, details)` pair or a `RewardOutput` (which may also carry
the decoded image, for logging). `rewards.weights` maps reward names to weights; every named
reward is computed and logged as `reward/<name>/mean|std`, and the total is their weighted sum.

Built-in (registered in `REWARDS` as factories over the actor's `RewardResources`):
- `format`, `degradation`, `understanding`: the text rewards of rewards/text.py, per sample;
- `generation`: the visual expert: it owns the VQ decoder, decodes each valid final image and
  scores the batch with the IQA metrics.

A user's own reward: `rewards.plugins: {name: "package.module:function"}` or
`{name: "path/to/file.py:function"}`, loaded inside each reward worker (so it runs in the IQA
environment, beside the built-ins) and weighted like any other.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from rewards.text import degradation_reward, format_reward, understanding_reward
from rewards.types import RewardInput
from vlcot.images import open_image
from vlcot.registry import Registry

if TYPE_CHECKING:  # a type only: rewards/config.py imports this module to check reward names
    from rewards.config import RewardsConfig

log = logging.getLogger(__name__)


@dataclass
class RewardOutput:
    score: float
    details: Dict[str, Any] = field(default_factory=dict)
    image: Optional[np.ndarray] = None  # uint8 [H, W, 3], when the reward decoded one


@dataclass
class RewardResources:
    """What built-in rewards may need, built once per reward worker."""

    cfg: RewardsConfig
    vq: Any = None  # vlcot.vq.VQTokenizer
    iqa: Any = None  # rewards.iqa.IQAScorer
    matcher: Any = None  # rewards.semantic.SemanticMatcher


RewardFn = Callable[[List[RewardInput]], Sequence[Any]]
REWARDS: Registry[Callable[[RewardResources], RewardFn]] = Registry("reward")


def per_sample(fn: Callable[[RewardInput], Tuple[float, Dict[str, Any]]]) -> RewardFn:
    """A batched reward from a per-sample one; a sample whose reward raises gets NaN (counted
    and replaced as non-finite) with the error in its details, and the others still score."""
    def batched(batch: List[RewardInput]) -> List[RewardOutput]:
        out = []
        for s in batch:
            try:
                score, details = fn(s)
            except Exception as exc:
                log.exception("reward failed on sample %s", s.sample_id)
                score, details = float("nan"), {"error": f"{type(exc).__name__}: {exc}"}
            out.append(RewardOutput(score, details))
        return out
    return batched


@REWARDS.register("format")
def _format(res: RewardResources) -> RewardFn:
    return per_sample(lambda s: format_reward(s.parsed, shaped=res.cfg.format_shaped))


@REWARDS.register("degradation")
def _degradation(res: RewardResources) -> RewardFn:
    return per_sample(lambda s: degradation_reward(s.parsed, s.labels, ordinal=res.cfg.degradation_ordinal))


@REWARDS.register("understanding")
def _understanding(res: RewardResources) -> RewardFn:
    return per_sample(lambda s: understanding_reward(s.parsed, s.tags, res.matcher))


class GenerationReward:
    """IQA of the decoded final image. Where image tokens become pixels: here, once per sample,
    in the reward worker (rollout workers ship VQ codes, 16 KB for a 512-px image, not pixels)."""

    def __init__(self, res: RewardResources):
        self.res = res

    def _decode(self, codes: List[np.ndarray]) -> List[np.ndarray]:
        """One sample per decoder call on purpose: batched convolutions differ in the last float
        bits, which can flip a rounded pixel, and a sample's reward must not depend on its
        batch-mates. (The IQA networks, whose outputs are batch-invariant, stay batched.)"""
        import torch

        out = []
        for c in codes:
            pixels = self.res.vq.decode(torch.as_tensor(c)[None])[0]
            out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        return out

    def __call__(self, batch: List[RewardInput]) -> List[RewardOutput]:
        out = [RewardOutput(0.0) for _ in batch]
        if self.res.iqa is None or self.res.vq is None:
            for o in out:
                o.details["skipped"] = "no VQ decoder or generation weight 0"
            return out
        valid = []
        for i, s in enumerate(batch):
            st = s.parsed.stages.get("final_image")
            if st is not None and st.valid and st.codes is not None:
                valid.append(i)
            else:
                out[i].details["invalid"] = st.reason if st is not None else "missing"
        if valid:
            decoded = self._decode([batch[i].parsed.stages["final_image"].codes for i in valid])
            refs = [_load_rgb(batch[i].hr_path) for i in valid] if self.res.cfg.generation.fidelity.metric else None
            for i, img, (score, raw) in zip(valid, decoded, self.res.iqa.score(decoded, refs)):
                out[i] = RewardOutput(score, raw, img)
        return out


REWARDS.register("generation")(GenerationReward)


def _load_rgb(path: Optional[str]) -> Optional[np.ndarray]:
    if not path:
        return None
    img, _, _ = open_image(path)
    return None if img is None else np.asarray(img)


# ---- a user's own rewards ---------------------------------------------------------------------
def _split_spec(spec: str) -> Tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"{spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    return target, name


def spec_problem(spec: str) -> Optional[str]:
    """Why a plug-in spec cannot work, checked without importing it (config validation runs in
    the driver's environment; the function is imported in the reward workers)."""
    try:
        target, _ = _split_spec(spec)
    except ValueError as exc:
        return str(exc)
    if target.endswith(".py") and not Path(target).is_file():
        return f"{target} not found"
    return None


def load_user_reward(spec: str) -> RewardFn:
    target, name = _split_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
        module_spec = importlib.util.spec_from_file_location(f"realsr_reward_{path.stem}", path)
        if module_spec is None or not path.is_file():
            raise ValueError(f"{target} not found")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{target} has no function {name!r}")
    return fn


# ---- the active rewards -------------------------------------------------------------------------
@dataclass
class ActiveReward:
    name: str
    weight: float
    fn: RewardFn


def build_rewards(cfg: RewardsConfig, res: RewardResources) -> List[ActiveReward]:
    """Every reward named in `cfg.weights`, in that order: built-ins from the registry, the
    others from `cfg.plugins`. A plug-in that cannot load is a ValueError naming its key."""
    active = []
    for name, weight in cfg.weights.items():
        if name in cfg.plugins:
            try:
                fn = load_user_reward(cfg.plugins[name])
            except Exception as exc:
                raise ValueError(f"rewards.plugins.{name}: cannot load {cfg.plugins[name]!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        else:
            fn = REWARDS.get(name)(res)
        active.append(ActiveReward(name, float(weight), fn))
    return active


def run_reward(reward: ActiveReward, batch: List[RewardInput]) -> List[RewardOutput]:
    """The reward's outputs for the batch, normalised; a reward that raises or returns the wrong
    count gives every sample NaN (counted and replaced as non-finite), never a crash."""
    try:
        raw = list(reward.fn(batch))
        if len(raw) != len(batch):
            raise ValueError(f"returned {len(raw)} scores for {len(batch)} samples")
        return [_as_output(r) for r in raw]
    except Exception as exc:
        log.exception("reward %s failed on a batch of %d", reward.name, len(batch))
        return [RewardOutput(float("nan"), {"error": f"{type(exc).__name__}: {exc}"}) for _ in batch]


def _as_output(r: Any) -> RewardOutput:
    if isinstance(r, RewardOutput):
        return r
    if isinstance(r, tuple) and len(r) == 2:
        return RewardOutput(float(r[0]), dict(r[1]))
    score = float(r)
    return RewardOutput(score if math.isfinite(score) else float("nan"))
