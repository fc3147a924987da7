"""Memory-safe selected-token log-probabilities.

The real vocabulary is ~73k and sequences ~10k tokens: a float32 [batch, seq, vocab] logits
tensor would be ~2.9 GB per sequence. Here logits exist only for `chunk` positions at a time,
and with gradients each chunk is recomputed in backward (activation checkpointing), so
neither pass holds more than one chunk of logits.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _logits(hidden: torch.Tensor, head) -> torch.Tensor:
    """`head` is the lm_head module (called, so ZeRO-3 gathers its weight) or a weight tensor."""
    return (F.linear(hidden, head) if isinstance(head, torch.Tensor) else head(hidden)).float()


def _chunk_logp(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float):
    logits = _logits(hidden, head)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse


@torch.no_grad()
def _chunk_entropy(hidden: torch.Tensor, head, temperature: float):
    logits = _logits(hidden, head)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def selected_logprobs(
    hidden: torch.Tensor,
    head,
    targets: torch.Tensor,
    chunk: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log softmax(hidden @ W^T / temperature)[target] per position.

    hidden: [B, T, H] (the hidden state that predicts `targets`); head: the lm_head module
    (preferred: under ZeRO-3 calling it gathers its weight) or its weight [V, H];
    targets: [B, T] int. Returns (logp [B, T] float32, entropy [B, T] float32 or None; the
    entropy carries no gradient: it is for logging).
    """
    b, t, h = hidden.shape
    flat_h = hidden.reshape(b * t, h)
    flat_y = targets.reshape(b * t)
    pieces, ents = [], []
    head_grad = head.requires_grad if isinstance(head, torch.Tensor) else any(p.requires_grad for p in head.parameters())
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_grad)
    for s in range(0, b * t, chunk):
        hs, ys = flat_h[s:s + chunk], flat_y[s:s + chunk]
        if needs_grad:
            pieces.append(checkpoint(_chunk_logp, hs, head, ys, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logp(hs, head, ys, temperature))
        if with_entropy:
            ents.append(_chunk_entropy(hs.detach(), head, temperature))
    logp = torch.cat(pieces).reshape(b, t) if pieces else hidden.new_zeros(b, t, dtype=torch.float32)
    ent = torch.cat(ents).reshape(b, t) if with_entropy and ents else None
    return logp, ent


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
                      chunk: int = 1024, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs of tokens input_ids[:, start + 1:] given their prefixes, under a causal LM
    whose base model is `model.model` and head `model.lm_head` (Chameleon / Llama layout),
    without materialising full logits. Pass `start` = shortest prompt length - 1 to skip
    work on prompt positions.

    input_ids, attention_mask: [B, L] (right padding); returns logp [B, L - 1 - start]
    (+ entropy), position j scoring token start + 1 + j.
    """
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0][:, start:-1, :]
    targets = input_ids[:, start + 1:]
    return selected_logprobs(hidden, model.lm_head, targets, chunk, temperature, with_entropy)
