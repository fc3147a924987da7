"""The shared-prompt pass: the responses to one prompt read that prompt once.

At paper shape a prompt is ~4.4k tokens (the LR image's 64x64 codes and the instruction) and a
response ~5.6k; GRPO samples G responses per prompt, so separate passes read each prompt G
times. Here one sequence holds the prompt once, then every response (a *pack*,
learner/packing.py). Each response's position ids continue from the prompt's end, as in its own
sequence. The policy's projections, MLPs and norms see every token once. Attention is torch SDPA
over each response's own sequence [prompt | response], batched over the pack's responses as a
right-padded micro-batch is, in one of two layouts (`PackSpans.queries`):

- *rows* (CPU): every row runs the separate pass's own causal call over all of its queries and
  keeps the response's outputs; the prompt's outputs come from the first row. The prompt's
  queries are recomputed in every row, as in the separate passes.
- *response queries* (CUDA): the prompt's queries run once (causal over the prompt), and each
  response's queries attend [prompt | response] keys under a causal mask aligned to the lower
  right (`causal_lower_right`), which SDPA's flash kernel runs without building a mask; this also
  saves (G - 1) P^2 / 2 attention scores per layer. On CPU SDPA materialises that mask and ran
  ~1.3-2.2x slower than the rows layout's causal kernel, so CPU keeps the rows.

Either way a response never sees another, each of its tokens has its separate pass's hidden
state, log-prob and entropy, and the gradients are the sum of the separate passes'. No [S, S]
mask exists, so a pack's attention memory is one response's separate pass.

The attention is registered with transformers as `PACK_ATTENTION` and installed on the learner's
policy (`use_pack_attention`); calls without a pack are plain SDPA, so SFT and `shared_prompt: off`
run exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from learner.logprobs import score_hidden

PACK_ATTENTION = "realsr_shared_prompt_sdpa"
SHARED_PROMPT_MODES = ("auto", "on", "off")
PACKABLE = ("sdpa", "eager")  # attention backends the pack attention stands in for (both are causal softmax attention)


def shared_prompt_mode(value) -> str:
    """`learner.shared_prompt` as one of SHARED_PROMPT_MODES: YAML reads a bare on/off as a boolean."""
    text = str(value).lower()
    return {"true": "on", "false": "off"}.get(text, text)


def resolve_shared_prompt(mode: str, attn_implementation: str) -> bool:
    """Whether the learner runs shared-prompt packs: `auto` wherever the policy's attention is one
    the pack attention reproduces (SDPA or eager); `on` refuses any other."""
    mode = shared_prompt_mode(mode)
    if mode not in SHARED_PROMPT_MODES:
        raise ValueError(f"learner.shared_prompt: {mode!r} not in {list(SHARED_PROMPT_MODES)}")
    supported = attn_implementation in PACKABLE or attn_implementation == PACK_ATTENTION
    if mode == "on" and not supported:
        raise ValueError(f"learner.shared_prompt=on: the policy's attention backend {attn_implementation!r} is not "
                         f"one the shared-prompt pass reproduces ({list(PACKABLE)}); use shared_prompt auto or off")
    return mode != "off" and supported


def queries_once(device) -> bool:
    """Whether packs on `device` use the response-queries layout: on CUDA, where SDPA's flash
    kernel runs the lower-right causal mask natively; elsewhere the rows layout (module doc)."""
    return torch.device(device).type == "cuda"


@dataclass
class PackSpans:
    """Where a pack's prompt and responses lie (handed to every attention layer). `rows` [G, W]:
    the pack positions of each response's own sequence, [prompt | response | padding at position
    0]. `queries` [G, W - prompt]: each response's own positions (same padding), set in the
    response-queries layout and None in the rows layout. `back` [S]: each pack position's place
    in the attention's outputs flattened — the rows' (the prompt's in row 0), or the prompt's
    outputs followed by the response queries'."""

    prompt: int
    rows: torch.Tensor
    back: torch.Tensor
    queries: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, prompt: int, responses: List[Tuple[int, int]], device,
           response_queries: Optional[bool] = None) -> "PackSpans":
        """From the prompt's length and each response's [start, end) in the pack; the layout is
        `queries_once(device)` unless `response_queries` says."""
        if response_queries is None:
            response_queries = queries_once(device)
        longest = max((e - s for s, e in responses), default=0)
        width = prompt + longest
        rows = np.zeros((max(len(responses), 1), width), dtype=np.int64)
        queries = np.zeros((len(responses), longest), dtype=np.int64)
        rows[:, :prompt] = np.arange(prompt)
        back = [np.arange(prompt)]
        for k, (s, e) in enumerate(responses):
            rows[k, prompt:prompt + e - s] = np.arange(s, e)
            queries[k, :e - s] = np.arange(s, e)
            back.append((prompt + k * longest if response_queries else k * width + prompt) + np.arange(e - s))

        def t(a):
            return torch.as_tensor(a, device=device)

        return cls(prompt, t(rows), t(np.concatenate(back)), t(queries) if response_queries else None)


def pack_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                   pack_spans: Optional[PackSpans] = None, **kwargs):
    """transformers attention function: SDPA per response over [prompt | response] when a pack is
    running, else transformers' own SDPA attention. q [1, H, S, D], k/v [1, H_kv, S, D] -> [1, S, H, D]."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if pack_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if key.shape[1] != query.shape[1]:
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)

    def per_response(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:  # [1, H, S, D] -> [G, H, w, D]
        return t[0][:, where].transpose(0, 1)

    def flat(t: torch.Tensor) -> torch.Tensor:  # [G, H, w, D] -> [H, G * w, D]
        g, h, w, d = t.shape
        return t.transpose(0, 1).reshape(h, g * w, d)

    k, v = per_response(key, pack_spans.rows), per_response(value, pack_spans.rows)  # right-padded rows
    if pack_spans.queries is None:  # rows: the separate passes' causal call (padding is never seen)
        out = flat(F.scaled_dot_product_attention(per_response(query, pack_spans.rows), k, v, dropout_p=dropout,
                                                  is_causal=True, scale=scaling))
    else:  # the prompt's queries once, then each response's over [prompt | response] keys
        p = pack_spans.prompt
        out = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], dropout_p=dropout,
                                             is_causal=True, scale=scaling)[0]
        r = pack_spans.queries.shape[1]
        if r:
            responses = F.scaled_dot_product_attention(per_response(query, pack_spans.queries), k, v,
                                                       attn_mask=causal_lower_right(r, p + r), dropout_p=dropout,
                                                       scale=scaling)
            out = torch.cat([out, flat(responses)], dim=1)
    out = out[:, pack_spans.back]  # [H, S, D]
    return out.transpose(0, 1)[None].contiguous(), None


def use_pack_attention(model) -> None:
    """Register the pack attention with transformers (its mask is SDPA's) and install it on `model`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACK_ATTENTION, pack_attention)
    AttentionMaskInterface.register(PACK_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACK_ATTENTION)


@dataclass
class PromptPack:
    """One prompt followed by its responses, as one sequence, and where each scored target goes."""

    input_ids: torch.Tensor  # [S]
    position_ids: torch.Tensor  # [S]
    spans: PackSpans
    source: torch.Tensor  # [M]: the pack position whose hidden state predicts each response token
    targets: torch.Tensor  # [M]: the response tokens
    rows: torch.Tensor  # [M]: each target's row ...
    cols: torch.Tensor  # [M]: ... and column in the separate passes' [b, L - 1 - start] layout

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def build_pack(input_ids: np.ndarray, attention_mask: np.ndarray, prompt_len: np.ndarray, start: int,
               device: torch.device, response_queries: Optional[bool] = None) -> PromptPack:
    """Rows of one prompt ([b, L] right-padded, each prompt + response) as one pack. Every row
    must carry the same prompt: a pack of different prompts would not be the separate passes.
    `response_queries` picks the attention layout (PackSpans.of)."""
    p = int(prompt_len[0])
    if np.any(prompt_len != p) or np.any(input_ids[:, :p] != input_ids[0, :p]):
        raise ValueError("a shared-prompt pack holds rows with different prompts (learner/packing.py plans packs "
                         "by identical prompt tokens)")
    lengths = attention_mask.sum(1).astype(np.int64)
    ids, pos, spans = [input_ids[0, :p]], [np.arange(p)], []
    source, targets, rows, cols = [], [], [], []
    offset = p
    for i, length in enumerate(lengths):
        r = int(length) - p
        ids.append(input_ids[i, p:length])
        pos.append(np.arange(p, p + r))
        spans.append((offset, offset + r))
        source.append(np.concatenate([[p - 1], np.arange(offset, offset + r - 1)]) if r else np.zeros(0, np.int64))
        targets.append(input_ids[i, p:length])
        rows.append(np.full(r, i, np.int64))
        cols.append(np.arange(p - 1, p - 1 + r) - start)
        offset += r

    def t(parts):
        return torch.as_tensor(np.concatenate(parts).astype(np.int64), device=device)

    return PromptPack(t(ids), t(pos), PackSpans.of(p, spans, device, response_queries), t(source), t(targets), t(rows),
                      t(cols))


def pack_logprobs(model, pack: PromptPack, shape: Tuple[int, int], chunk: int = 1024, temperature: float = 1.0,
                  with_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropy) of the pack's response tokens laid out as the separate passes
    lay them out: [b, T] (`shape`), 0 where no response token is scored. `model` runs the pack
    attention (`use_pack_attention`)."""
    if model.config._attn_implementation != PACK_ATTENTION:
        raise ValueError(f"a shared-prompt pack needs the pack attention installed (use_pack_attention); the policy "
                         f"runs {model.config._attn_implementation!r}")
    ones = torch.ones(1, pack.length, dtype=torch.long, device=pack.input_ids.device)  # no padding: no mask is built
    out = model.model(input_ids=pack.input_ids[None], attention_mask=ones, position_ids=pack.position_ids[None],
                      use_cache=False, pack_spans=pack.spans)
    hidden = out[0][0].index_select(0, pack.source)[None]
    logp, ent = score_hidden(model, hidden, pack.targets[None], chunk, temperature, with_entropy)
    where = (pack.rows, pack.cols)
    logp = logp.new_zeros(shape).index_put(where, logp[0])
    if ent is not None:
        ent = ent.new_zeros(shape).index_put(where, ent[0])
    return logp, ent
