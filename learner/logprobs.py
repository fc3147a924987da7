"""Memory-safe selected-token log-probabilities.

The real vocabulary is ~73k and sequences ~10k tokens: a float32 [batch, seq, vocab] logits
tensor would be ~2.9 GB per sequence. Here logits exist only for `chunk` positions at a time,
and with gradients each chunk is recomputed in backward (activation checkpointing), so
neither pass holds more than one chunk of logits.

Under DeepSpeed ZeRO-3 the lm_head weight (~600 MB at 7B) is gathered for every call of the
lm_head module. `ChunkedLMHead` runs the whole chunk loop inside ONE call of the module (on
its gathered weight), so a pass gathers it once for the forward and once for the backward,
and the order in which modules are called — what ZeRO-3 traces to prefetch parameters — no
longer depends on the sequence length (a length-dependent order differs between ranks and
between micro-batches; learner/zero3.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
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


class ChunkedLMHead(nn.Linear):
    """A bias-free lm_head that, given targets, scores them chunk by chunk in this one call.

    `head(hidden)` is the plain linear layer (generation, HF forward). `head(hidden, targets,
    chunk, temperature, with_entropy)` is `selected_logprobs` on `self.weight`: module hooks
    (ZeRO-3's gather before, release after, and the same around the backward) fire once for all
    chunks. Arguments are positional: DeepSpeed's hooks see positional inputs only."""

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None, chunk: int = 1024,
                temperature: float = 1.0, with_entropy: bool = False):
        if targets is None:
            return super().forward(hidden)
        return selected_logprobs(hidden, self.weight, targets, chunk, temperature, with_entropy)


def use_chunked_head(model) -> bool:
    """Make `model.lm_head` (a bias-free nn.Linear) a `ChunkedLMHead` in place: same parameter,
    same name, same state dict. Call before handing the model to DeepSpeed. False (and nothing
    changed) for any other head, which `sequence_logprobs` then calls once per chunk."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, ChunkedLMHead):
        return True
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    head.__class__ = ChunkedLMHead
    return True


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
    return score_hidden(model, out[0][:, start:-1, :], input_ids[:, start + 1:], chunk, temperature, with_entropy)


def score_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024, temperature: float = 1.0,
                 with_entropy: bool = False):
    """`selected_logprobs` of `targets` [B, T] from the base model's `hidden` [B, T, H] through
    `model.lm_head`: one module call for every chunk when it is a `ChunkedLMHead`."""
    if isinstance(model.lm_head, ChunkedLMHead):
        return model.lm_head(hidden, targets, chunk, temperature, with_entropy)
    return selected_logprobs(hidden, model.lm_head, targets, chunk, temperature, with_entropy)
