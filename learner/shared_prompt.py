"""The shared-prompt pass: the responses to one prompt read that prompt once.

At paper shape a prompt is ~4.2k tokens (the LR image's 64x64 codes and the instruction) and a
response ~5.8k; GRPO samples G responses per prompt, so separate passes read each prompt G
times. Here one sequence holds the prompt once, then every response (a *pack*,
learner/packing.py). The attention mask lets each response token see the prompt and its own
earlier tokens, never another response; each response's position ids continue from the
prompt's end, as in its own sequence. A response token's hidden state therefore equals the one
of its separate pass, and so do its log-prob, its entropy and (summed over the pack's
responses) its gradients. The first response token of every response is predicted from the
prompt's last hidden state, which the pack computes once and all responses share.

Backends (`learner.attn_implementation`): `sdpa` and `eager` take a dense boolean [S, S] mask
(S = the pack's length: ~100 MB at 10k tokens, so cap packs with `learner.pack_max_tokens` on GPUs
running SDPA); `flex_attention` takes a FlexAttention BlockMask, whose memory is one entry per
128x128 block (the backend for long packs on GPUs; FlexAttention has no CPU backward).
Flash-attention kernels take no such mask: `shared_prompt: auto` turns the pass off there and
`on` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from learner.logprobs import score_hidden

# attention backends that run a pack, and the mask each is given
PACK_MASKS = {"sdpa": "dense", "eager": "dense", "flex_attention": "block"}
SHARED_PROMPT_MODES = ("auto", "on", "off")


def resolve_shared_prompt(mode: str, attn_implementation: str) -> bool:
    """Whether the learner runs shared-prompt packs: `auto` where the backend takes the mask."""
    if mode not in SHARED_PROMPT_MODES:
        raise ValueError(f"learner.shared_prompt: {mode!r} not in {list(SHARED_PROMPT_MODES)}")
    supported = attn_implementation in PACK_MASKS
    if mode == "on" and not supported:
        raise ValueError(f"learner.shared_prompt=on: the policy's attention backend {attn_implementation!r} takes "
                         f"no block mask; use learner.attn_implementation in {sorted(PACK_MASKS)}, or shared_prompt "
                         f"auto/off")
    return mode != "off" and supported


@dataclass
class PromptPack:
    """One prompt followed by its responses, as one sequence, and where each scored target goes."""

    input_ids: torch.Tensor  # [S]
    position_ids: torch.Tensor  # [S]
    segment: torch.Tensor  # [S]: 0 on the prompt, k + 1 on the k-th response
    source: torch.Tensor  # [M]: the pack position whose hidden state predicts each response token
    targets: torch.Tensor  # [M]: the response tokens
    rows: torch.Tensor  # [M]: each target's row ...
    cols: torch.Tensor  # [M]: ... and column in the separate passes' [b, L - 1 - start] layout

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def build_pack(input_ids: np.ndarray, attention_mask: np.ndarray, prompt_len: np.ndarray, start: int,
               device: torch.device) -> PromptPack:
    """Rows of one prompt ([b, L] right-padded, each prompt + response) as one pack. Every row
    must carry the same prompt: a pack of different prompts would not be the separate passes."""
    p = int(prompt_len[0])
    if np.any(prompt_len != p) or np.any(input_ids[:, :p] != input_ids[0, :p]):
        raise ValueError("a shared-prompt pack holds rows with different prompts (learner/packing.py plans packs "
                         "by identical prompt tokens)")
    lengths = attention_mask.sum(1).astype(np.int64)
    ids, pos, seg = [input_ids[0, :p]], [np.arange(p)], [np.zeros(p, np.int64)]
    source, targets, rows, cols = [], [], [], []
    offset = p
    for i, length in enumerate(lengths):
        r = int(length) - p
        ids.append(input_ids[i, p:length])
        pos.append(np.arange(p, p + r))
        seg.append(np.full(r, i + 1, np.int64))
        source.append(np.concatenate([[p - 1], np.arange(offset, offset + r - 1)]) if r else np.zeros(0, np.int64))
        targets.append(input_ids[i, p:length])
        rows.append(np.full(r, i, np.int64))
        cols.append(np.arange(p - 1, p - 1 + r) - start)
        offset += r

    def t(parts):
        return torch.as_tensor(np.concatenate(parts).astype(np.int64), device=device)

    return PromptPack(t(ids), t(pos), t(seg), t(source), t(targets), t(rows), t(cols))


def dense_mask(segment: torch.Tensor) -> torch.Tensor:
    """[1, 1, S, S] bool: causal, and a response sees the prompt and itself only."""
    q, k = segment[:, None], segment[None, :]
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool, device=segment.device).tril()
    return (causal & ((k == 0) | (k == q)))[None, None]


def block_mask(segment: torch.Tensor):
    """The same mask as a FlexAttention BlockMask (memory per 128x128 block, not per entry)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, kv):
        return (kv <= q) & ((segment[kv] == 0) | (segment[kv] == segment[q]))

    s = len(segment)
    return create_block_mask(allowed, 1, None, s, s, device=str(segment.device))


def pack_logprobs(model, pack: PromptPack, shape: Tuple[int, int], chunk: int = 1024, temperature: float = 1.0,
                  with_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropy) of the pack's response tokens laid out as the separate passes
    lay them out: [b, T] (`shape`), 0 where no response token is scored."""
    backend = model.config._attn_implementation
    kind = PACK_MASKS.get(backend)
    if kind is None:
        raise ValueError(f"attention backend {backend!r} cannot run a shared-prompt pack (learner/shared_prompt.py)")
    mask = dense_mask(pack.segment) if kind == "dense" else block_mask(pack.segment)
    out = model.model(input_ids=pack.input_ids[None], attention_mask=mask, position_ids=pack.position_ids[None],
                      use_cache=False)
    hidden = out[0][0].index_select(0, pack.source)[None]
    logp, ent = score_hidden(model, hidden, pack.targets[None], chunk, temperature, with_entropy)
    where = (pack.rows, pack.cols)
    logp = logp.new_zeros(shape).index_put(where, logp[0])
    if ent is not None:
        ent = ent.new_zeros(shape).index_put(where, ent[0])
    return logp, ent
