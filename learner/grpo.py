"""GRPO as pure tensor functions (no Ray, DeepSpeed or vLLM).

Shapes: N samples (prompts x G), T response tokens. `mask` is 1 on response tokens that
count, 0 on padding. Every function is differentiable where a loss needs it and has no
side effects.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from vlcot.registry import Registry


# ---- aggregation ------------------------------------------------------------------------------
class Aggregation:
    """How per-token values [N, T] reduce to a scalar, and the normaliser that makes the
    reduction global when a batch is split over micro-batches and ranks: each rank computes
    `local_denominator` on its shard, the learner all-reduces the sum and passes it back as
    `denominator`."""

    def reduce(self, values: torch.Tensor, mw: torch.Tensor, m: torch.Tensor, denominator: Optional[float],
               norm_tokens: Optional[int]) -> torch.Tensor:
        raise NotImplementedError

    def local_denominator(self, loss_mask: np.ndarray, weights: np.ndarray, norm_tokens: int) -> float:
        """loss_mask [n, T] (0/1), weights [n, T] (token weight x loss_mask) of this shard."""
        raise NotImplementedError


AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


class TokenMean(Aggregation):
    """sum(v*m*w) / sum(m*w) over all tokens."""

    def reduce(self, values, mw, m, denominator, norm_tokens):
        denom = mw.sum() if denominator is None else torch.tensor(float(denominator), dtype=values.dtype)
        return (values * mw).sum() / denom.clamp_min(1e-12)

    def local_denominator(self, loss_mask, weights, norm_tokens):
        return float(weights.sum())


class SeqMeanTokenMean(Aggregation):
    """Mean over sequences of sum_t(v*m*w) / sum_t(m*w) (the released RealSR-R1)."""

    def reduce(self, values, mw, m, denominator, norm_tokens):
        per_seq = (values * mw).sum(-1) / mw.sum(-1).clamp_min(1e-12)
        per_seq = per_seq * (m.sum(-1) > 0)
        denom = values.shape[0] if denominator is None else denominator
        return per_seq.sum() / max(float(denom), 1e-12)

    def local_denominator(self, loss_mask, weights, norm_tokens):
        return float((loss_mask.sum(1) > 0).sum())


class SeqMeanTokenSumNorm(Aggregation):
    """sum(v*m*w) / (N * norm_tokens) (Dr. GRPO; norm_tokens defaults to T)."""

    def reduce(self, values, mw, m, denominator, norm_tokens):
        denom = values.shape[0] * (norm_tokens or values.shape[-1]) if denominator is None else denominator
        return (values * mw).sum() / max(float(denom), 1e-12)

    def local_denominator(self, loss_mask, weights, norm_tokens):
        return float(len(loss_mask) * norm_tokens)


AGGREGATIONS.register("token-mean")(TokenMean())
AGGREGATIONS.register("seq-mean-token-mean")(SeqMeanTokenMean())
AGGREGATIONS.register("seq-mean-token-sum-norm")(SeqMeanTokenSumNorm())


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, weights: Optional[torch.Tensor] = None,
              denominator: Optional[float] = None, norm_tokens: Optional[int] = None) -> torch.Tensor:
    """Reduce per-token values [N, T] to a scalar with the registered aggregation `mode`.

    `weights` [N, T] scales each token (e.g. text vs image tokens). `denominator` replaces
    the normaliser (the token count, sequence count or N*norm_tokens) with a global value
    when the batch is split over micro-batches and ranks.
    """
    agg = AGGREGATIONS.get(mode)
    m = mask.to(values.dtype)
    mw = m if weights is None else m * weights.to(values.dtype)
    return agg.reduce(values, mw, m, denominator, norm_tokens)


# ---- policy loss ------------------------------------------------------------------------------
def truncated_is_weights(learner_old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap), no gradient: corrects for
    the rollout engine's log-probs differing from the learner's (vLLM vs HF kernels)."""
    return torch.exp(learner_old_logp - rollout_logp).clamp(max=cap).detach()


PolicyLoss = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("clipped")
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


@POLICY_LOSSES.register("unclipped")
def unclipped_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, mode="token-mean",
                          token_weights=None, is_weights=None, denominator=None, norm_tokens=None):
    """-r A with no clipping (the released RealSR-R1 objective: one update per batch, so r = 1
    in value and only its gradient matters). Same arguments and statistics as `policy_loss`."""
    return policy_loss(logp, old_logp, advantages, mask, float("inf"), float("inf"), mode, token_weights,
                       is_weights, denominator, norm_tokens)


# ---- KL to the reference ----------------------------------------------------------------------
KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logp - ref_logp: unbiased, high variance, can be negative."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(logp - ref_logp)^2 / 2: biased, non-negative, low variance."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1: unbiased, non-negative, low variance."""
    d = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(d) - d - 1.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate [N, T] from sampled-token log-probs with the
    registered `estimator`."""
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp)


def token_type_weights(is_image: torch.Tensor, text_weight: float, image_weight: float) -> Optional[torch.Tensor]:
    """[N, T] bool image-token mask -> per-token loss weights (None when both weights are 1)."""
    if text_weight == 1.0 and image_weight == 1.0:
        return None
    return torch.where(is_image, torch.tensor(image_weight), torch.tensor(text_weight)).to(torch.float32)
