"""Advantage estimators as registered pure tensor functions (no Ray, DeepSpeed or vLLM).

Each maps rewards [N] and group indices [N] (the samples of one prompt share an index) to
advantages [N] and declares the smallest group it can learn from: config validation refuses
`rollout.group_size` below it, since every advantage would be exactly 0.

| name | advantage | min group |
|---|---|---|
| grpo | (r - mean_g) / (std_g + eps), unbiased std (the released code) | 2 |
| dr_grpo | r - mean_g (Dr. GRPO: no std normalisation) | 2 |
| rloo | r_i - mean of the other samples of its group = G/(G-1) (r_i - mean_g) | 2 |
| reinforce_pp_baseline | r - mean_g, then divided by the std over the whole batch (REINFORCE++-baseline) | 2 |

A group whose rewards are all equal, or of size 1, gets exactly 0 under every estimator.

`learner.grpo.normalise` picks what the estimator sees: `total` (published) runs it once on
the weighted total; `per_reward` runs it on each reward separately and sums the weighted
results (`per_reward_advantages`), so a reward with a small spread (the degradation words
beside the 0/1 format) still moves the advantage as much as its weight says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, NamedTuple, Tuple

import torch

from vlcot.registry import Registry


@dataclass
class AdvantageStats:
    num_groups: int
    zero_std_groups: int  # groups whose rewards are all equal: no learning signal

    @property
    def zero_std_fraction(self) -> float:
        return self.zero_std_groups / max(1, self.num_groups)


class GroupMoments(NamedTuple):
    inverse: torch.Tensor  # [N] group slot of each sample
    count: torch.Tensor  # [G]
    mean: torch.Tensor  # [G]
    std: torch.Tensor  # [G] unbiased
    flat: torch.Tensor  # [G] bool: all rewards equal, or a single sample

    def stats(self) -> AdvantageStats:
        return AdvantageStats(num_groups=len(self.count), zero_std_groups=int(self.flat.sum()))


def group_moments(rewards: torch.Tensor, group_index: torch.Tensor, zero_std_tol: float = 1e-8) -> GroupMoments:
    rewards = rewards.double()
    _, inv = torch.unique(group_index, return_inverse=True)
    g = int(inv.max()) + 1 if len(inv) else 0
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, rewards) / count
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    return GroupMoments(inv, count, mean, std, (std <= zero_std_tol) | (count < 2))


@dataclass(frozen=True)
class AdvantageEstimator:
    fn: Callable[[torch.Tensor, torch.Tensor, float], Tuple[torch.Tensor, AdvantageStats]]
    min_group_size: int


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def advantage_estimator(name: str, min_group_size: int = 2):
    """Register `fn(rewards [N], group_index [N], eps) -> (advantages [N], AdvantageStats)`."""
    def add(fn):
        ADVANTAGE_ESTIMATORS.register(name)(AdvantageEstimator(fn, min_group_size))
        return fn
    return add


def estimate_advantages(name: str, rewards: torch.Tensor, group_index: torch.Tensor,
                        eps: float = 1e-6) -> Tuple[torch.Tensor, AdvantageStats]:
    return ADVANTAGE_ESTIMATORS.get(name).fn(rewards, group_index, eps)


def _zero_flat(adv: torch.Tensor, m: GroupMoments) -> torch.Tensor:
    return torch.where(m.flat[m.inverse], torch.zeros_like(adv), adv)


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6, std_normalize: bool = True,
    zero_std_tol: float = 1e-8,
) -> Tuple[torch.Tensor, AdvantageStats]:
    """Group-relative advantages: (r - mean_g) / (std_g + eps) with the unbiased per-group std
    (as torch.std, the released code), or r - mean_g when `std_normalize` is False (Dr. GRPO).
    A group whose rewards are all equal (or of size 1) gets exactly 0."""
    m = group_moments(rewards, group_index, zero_std_tol)
    centred = rewards.double() - m.mean[m.inverse]
    adv = centred / (m.std[m.inverse] + eps) if std_normalize else centred
    return _zero_flat(adv, m).float(), m.stats()


@advantage_estimator("grpo")
def grpo_advantages(rewards, group_index, eps):
    return group_advantages(rewards, group_index, eps, std_normalize=True)


@advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards, group_index, eps):
    return group_advantages(rewards, group_index, eps, std_normalize=False)


@advantage_estimator("rloo")
def rloo_advantages(rewards, group_index, eps):
    """Leave-one-out baseline: each sample against the mean of the rest of its group."""
    m = group_moments(rewards, group_index)
    n = m.count[m.inverse]
    adv = n / (n - 1).clamp_min(1) * (rewards.double() - m.mean[m.inverse])
    return _zero_flat(adv, m).float(), m.stats()


@advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards, group_index, eps):
    """Group-mean baseline, then one normalisation over the whole batch (not per group)."""
    m = group_moments(rewards, group_index)
    adv = _zero_flat(rewards.double() - m.mean[m.inverse], m)
    std = adv.std() if adv.numel() > 1 else torch.zeros((), dtype=adv.dtype)
    return (adv / (std + eps)).float(), m.stats()


NORMALISE_MODES = ("total", "per_reward")


def per_reward_advantages(name: str, components: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                          group_index: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, AdvantageStats]:
    """Estimator `name` on each reward of `components` ({name: [N]}) within the groups, the
    results summed with `weights`, then divided by the batch std of that sum (so its scale
    does not grow with the number of rewards). A group counts as flat (stats) when every one
    of its rewards is flat: then its advantage is exactly 0, as under `total`."""
    if not components:
        raise ValueError("per_reward normalisation needs at least one reward component")
    summed = torch.zeros(len(group_index), dtype=torch.float64)
    flat: Dict[str, torch.Tensor] = {}
    moments = None
    for key, rewards in components.items():
        adv, _ = estimate_advantages(name, rewards, group_index, eps)
        summed += float(weights.get(key, 0.0)) * adv.double()
        moments = group_moments(rewards, group_index)
        flat[key] = moments.flat if weights.get(key, 0.0) else torch.ones_like(moments.flat)
    all_flat = torch.stack(list(flat.values())).all(dim=0)
    std = summed.std() if summed.numel() > 1 else torch.zeros((), dtype=summed.dtype)
    adv = torch.where(all_flat[moments.inverse], torch.zeros_like(summed), summed / (std + eps))
    return adv.float(), AdvantageStats(num_groups=len(all_flat), zero_std_groups=int(all_flat.sum()))


def batch_advantages(normalise: str, name: str, total: torch.Tensor, components: Mapping[str, torch.Tensor],
                     weights: Mapping[str, float], group_index: torch.Tensor,
                     eps: float = 1e-6) -> Tuple[torch.Tensor, AdvantageStats]:
    """The advantages of one rollout batch as `learner.grpo.normalise` says: estimator `name`
    on the weighted `total` [N], or on each of `components` ({reward: [N]}) (per_reward)."""
    if normalise == "per_reward":
        return per_reward_advantages(name, components, weights, group_index, eps)
    if normalise != "total":
        raise ValueError(f"learner.grpo.normalise {normalise!r} not in {list(NORMALISE_MODES)}")
    return estimate_advantages(name, total, group_index, eps)
