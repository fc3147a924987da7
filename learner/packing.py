"""Which samples share a prompt pass, and which rank runs them (numpy only: the learner group
plans on the driver, the ranks follow the plan).

With the shared-prompt pass (learner/shared_prompt.py) a micro-batch is one *pack*: one copy of
a prompt followed by some of the responses sampled for it. Samples share a pack only when their
prompt tokens are identical (a GRPO group: one prompt, G samples), so the pack is exact whatever
the batch says about groups. A pack holds a whole group unless `max_tokens` caps it.

Every rank must run the same number of forward/backward passes (ZeRO's collectives run once per
pass), so the plan gives every rank the same number of packs: packs are split (the one with the
most samples first) until their count divides by the ranks, which always ends because the batch
itself does. Packs go to ranks largest first, each to the rank with the fewest tokens so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


@dataclass
class RankPlan:
    """One rank's share of a batch: `rows` of the batch (its shard, in this order) and `pack` [len(rows)],
    each row's micro-batch (pack) number on the rank, 0..packs-1."""

    rows: np.ndarray
    pack: np.ndarray

    @property
    def packs(self) -> int:
        return int(self.pack.max()) + 1 if len(self.pack) else 0


def prompt_groups(input_ids: np.ndarray, prompt_len: np.ndarray) -> np.ndarray:
    """[n] group number per sample, 0.. in order of first appearance: equal numbers iff equal prompts."""
    seen: Dict[bytes, int] = {}
    out = np.empty(len(input_ids), dtype=np.int64)
    for i, (row, p) in enumerate(zip(input_ids, prompt_len)):
        out[i] = seen.setdefault(np.ascontiguousarray(row[: int(p)]).tobytes(), len(seen))
    return out


def _packs_of_group(rows: np.ndarray, prompt: int, responses: np.ndarray, max_tokens: int) -> List[np.ndarray]:
    """A group's rows cut into packs of at most `max_tokens` (prompt + responses; 0 = no cap),
    at least one response each."""
    if max_tokens <= 0:
        return [rows]
    packs, current, size = [], [], prompt
    for row, r in zip(rows, responses):
        if current and size + r > max_tokens:
            packs.append(np.asarray(current))
            current, size = [], prompt
        current.append(row)
        size += r
    packs.append(np.asarray(current))
    return packs


def plan_packs(input_ids: np.ndarray, attention_mask: np.ndarray, prompt_len: np.ndarray, ranks: int,
               max_tokens: int = 0) -> List[RankPlan]:
    """The batch's rows as packs over `ranks`, every rank the same number of packs."""
    n = len(input_ids)
    if n % ranks:
        raise ValueError(f"batch of {n} samples does not split over {ranks} learner ranks")
    groups = prompt_groups(input_ids, prompt_len)
    lengths = attention_mask.sum(1).astype(np.int64)
    responses = lengths - prompt_len.astype(np.int64)
    packs: List[np.ndarray] = []
    for g in range(int(groups.max()) + 1 if n else 0):
        rows = np.nonzero(groups == g)[0]
        packs += _packs_of_group(rows, int(prompt_len[rows[0]]), responses[rows], max_tokens)
    while len(packs) % ranks:  # terminates: n % ranks == 0, and n one-sample packs would divide
        k = max(range(len(packs)), key=lambda i: (len(packs[i]), -i))
        half = (len(packs[k]) + 1) // 2
        packs[k: k + 1] = [packs[k][:half], packs[k][half:]]
    tokens = [int(prompt_len[p[0]]) + int(responses[p].sum()) for p in packs]
    per_rank = len(packs) // ranks
    loads, owned = [0] * ranks, [[] for _ in range(ranks)]
    for k in sorted(range(len(packs)), key=lambda i: (-tokens[i], i)):
        r = min((r for r in range(ranks) if len(owned[r]) < per_rank), key=lambda r: (loads[r], r))
        owned[r].append(k)
        loads[r] += tokens[k]
    plans = []
    for ks in owned:
        ks = sorted(ks, key=lambda k: int(packs[k][0]))  # the batch's order, for reproducible runs
        rows = np.concatenate([packs[k] for k in ks]) if ks else np.zeros(0, dtype=np.int64)
        pack = np.concatenate([np.full(len(packs[k]), j) for j, k in enumerate(ks)]) if ks else np.zeros(0, np.int64)
        plans.append(RankPlan(rows.astype(np.int64), pack.astype(np.int64)))
    return plans


def pack_micro_batches(pack: np.ndarray, rows: Sequence[int]) -> List[np.ndarray]:
    """`rows` (of a rank's shard) grouped by their pack, packs in order of first appearance."""
    rows = np.asarray(rows, dtype=np.int64)
    order: Dict[int, List[int]] = {}
    for i in rows:
        order.setdefault(int(pack[i]), []).append(int(i))
    return [np.asarray(v, dtype=np.int64) for v in order.values()]
