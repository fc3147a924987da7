"""GRPO as pure tensor functions (no Ray, DeepSpeed or vLLM).

Shapes: N samples (prompts x G), T response tokens. `mask` is 1 on response tokens that
count, 0 on padding. Every function is differentiable where a loss needs it and has no
side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


# ---- advantages -------------------------------------------------------------------------------
@dataclass
class AdvantageStats:
    num_groups: int
    zero_std_groups: int  # groups whose rewards are all equal: no learning signal

    @property
    def zero_std_fraction(self) -> float:
        return self.zero_std_groups / max(1, self.num_groups)


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6, std_normalize: bool = True,
    zero_std_tol: float = 1e-8,
) -> Tuple[torch.Tensor, AdvantageStats]:
    """Group-relative advantages.

    rewards: [N] float; group_index: [N] int (samples of one prompt share an index).
    Returns advantages [N] = (r - mean_g) / (std_g + eps) with the unbiased per-group std
    (as torch.std, the released code), or r - mean_g when `std_normalize` is False
    (Dr. GRPO). A group whose rewards are all equal (or of size 1) gets exactly 0.
    """
    rewards = rewards.double()
    _, inv = torch.unique(group_index, return_inverse=True)
    g = int(inv.max()) + 1 if len(inv) else 0
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, rewards) / count
    centred = rewards - mean[inv]
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, centred**2)
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    flat = (std <= zero_std_tol) | (count < 2)
    adv = centred / (std[inv] + eps) if std_normalize else centred
    adv = torch.where(flat[inv], torch.zeros_like(adv), adv)
    return adv.float(), AdvantageStats(num_groups=g, zero_std_groups=int(flat.sum()))


# ---- aggregation ------------------------------------------------------------------------------
def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, weights: Optional[torch.Tensor] = None,
              denominator: Optional[float] = None, norm_tokens: Optional[int] = None) -> torch.Tensor:
    """Reduce per-token values [N, T] to a scalar.

    token-mean: sum(v*m*w) / sum(m*w) over all tokens.
    seq-mean-token-mean: mean over sequences of sum_t(v*m*w) / sum_t(m*w) (released RealSR-R1).
    seq-mean-token-sum-norm: sum(v*m*w) / (N * norm_tokens) (Dr. GRPO; norm_tokens defaults to T).

    `weights` [N, T] scales each token (e.g. text vs image tokens). `denominator` replaces
    the normaliser (the token count, sequence count or N*norm_tokens) with a global value
    when the batch is split over micro-batches and ranks.
    """
    m = mask.to(values.dtype)
    mw = m if weights is None else m * weights.to(values.dtype)
    if mode == "token-mean":
        denom = mw.sum() if denominator is None else torch.tensor(float(denominator), dtype=values.dtype)
        return (values * mw).sum() / denom.clamp_min(1e-12)
    if mode == "seq-mean-token-mean":
        per_seq = (values * mw).sum(-1) / mw.sum(-1).clamp_min(1e-12)
        per_seq = per_seq * (m.sum(-1) > 0)
        denom = values.shape[0] if denominator is None else denominator
        return per_seq.sum() / max(float(denom), 1e-12)
    if mode == "seq-mean-token-sum-norm":
        denom = values.shape[0] * (norm_tokens or values.shape[-1]) if denominator is None else denominator
        return (values * mw).sum() / max(float(denom), 1e-12)
    raise ValueError(f"loss aggregation {mode!r} not in {LOSS_AGG_MODES}")


# ---- policy loss ------------------------------------------------------------------------------
def truncated_is_weights(learner_old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap), no gradient: corrects for
    the rollout engine's log-probs differing from the learner's (vLLM vs HF kernels)."""
    return torch.exp(learner_old_logp - rollout_logp).clamp(max=cap).detach()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    mode: str = "token-mean",
    token_weights: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    denominator: Optional[float] = None,
    norm_tokens: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(logp - old_logp).

    logp, old_logp, mask: [N, T]; advantages: [N] (broadcast over tokens) or [N, T];
    is_weights [N, T]: optional truncated importance weights multiplying each token's loss.
    Returns (scalar loss, {"clip_fraction", "ratio_mean", "approx_kl"} detached).
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, mode, token_weights, denominator, norm_tokens)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        n = m.sum().clamp_min(1)
        was_clipped = ((ratio * adv) > (clipped * adv)).to(logp.dtype)
        stats = {
            "clip_fraction": (was_clipped * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "approx_kl": ((old_logp - logp) * m).sum() / n,
        }
    return loss, stats


# ---- KL to the reference ----------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate [N, T] from sampled-token log-probs.

    k1 = logp - ref_logp (unbiased, high variance, can be negative);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative, low variance).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = (ref_logp - logp).clamp(-20, 20)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"KL estimator {estimator!r} not in {KL_ESTIMATORS}")


def token_type_weights(is_image: torch.Tensor, text_weight: float, image_weight: float) -> Optional[torch.Tensor]:
    """[N, T] bool image-token mask -> per-token loss weights (None when both weights are 1)."""
    if text_weight == 1.0 and image_weight == 1.0:
        return None
    return torch.where(is_image, torch.tensor(image_weight), torch.tensor(text_weight)).to(torch.float32)
