"""Packing token sequences into the learner's batch arrays (numpy: zero-copy through Ray).

Layout: each row is prompt + response, right-padded to the longest row (L). Per-target
arrays have L - 1 columns: column j describes token j + 1 given tokens 0..j.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int = 0,
         image_token_ids: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """-> input_ids, attention_mask [N, L]; loss_mask, is_image [N, L-1] (loss on response tokens);
    prompt_len [N] (which the shared-prompt pass packs by: learner/packing.py).

    `image_token_ids`: ids counted as image tokens (pass `TokenLayout.image_span_ids()`:
    codes and the span's structure tokens)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need as many responses as prompts, at least one")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lengths)
    n = len(prompts)
    ids = np.full((n, L), pad_id, dtype=np.int64)
    am = np.zeros((n, L), dtype=np.int64)
    lm = np.zeros((n, L - 1), dtype=np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sample {i} has an empty prompt")
        seq = list(p) + list(r)
        ids[i, : len(seq)] = seq
        am[i, : len(seq)] = 1
        lm[i, len(p) - 1 : len(seq) - 1] = 1.0
    is_image = np.zeros((n, L - 1), dtype=np.float32)
    if image_token_ids is not None:
        is_image = np.isin(ids[:, 1:], image_token_ids).astype(np.float32)
    prompt_len = np.asarray([len(p) for p in prompts], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "is_image": is_image, "prompt_len": prompt_len}


def pack_grpo(prompts, responses, advantages, rollout_logps=None, pad_id: int = 0,
              image_token_ids: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """`pack` plus advantages [N] and the rollout engine's per-token log-probs [N, L-1]."""
    batch = pack(prompts, responses, pad_id, image_token_ids)
    batch["advantages"] = np.asarray(advantages, dtype=np.float32).reshape(-1)
    if rollout_logps is not None:
        rl = np.zeros_like(batch["loss_mask"])
        for i, (p, lp) in enumerate(zip(prompts, rollout_logps)):
            if len(lp) != len(responses[i]):
                raise ValueError(f"sample {i}: {len(lp)} rollout log-probs for {len(responses[i])} tokens")
            rl[i, len(p) - 1 : len(p) - 1 + len(lp)] = lp
        batch["rollout_logp"] = rl
    return batch
