"""vLLM's side of the VLCoT decoding: one V1 logits processor that applies the span rules to
every request carrying them, and classifier-free guidance (CFG) across pairs of rows.

Rows are of three kinds, told apart by `SamplingParams.extra_args`:
- ruled rows (`RULES_KEY`): the span rules of `rollout.rules`, as in the HF engine;
- guided rows (`RULES_KEY` + `GUIDE_KEY`): ruled rows whose image codes follow CFG;
- twin rows (`TWIN_KEY`): a guided row's unconditional branch for one image. Its context is
  only that image's span so far (image_start, grid tokens, codes), as in the released
  inference code and the HF engine. `VLLMEngine` adds a twin when its sample opens an image,
  so the twin runs in the same engine batch, one position per step, in step with its sample.

At a guided row's image-code position, with its twin in the batch at the same position:
    guided = uncond + s * (cond - uncond)
goes through the span rules (adaptive top-k on the guided codes); the processor draws the
token itself (its own generator per sample; argmax when the request is greedy) and forces it
on both rows, so the twin's context stays the sample's. Forced tokens (grid, newline,
image_end) are forced on both rows too; the twin stops at image_end. The sample's log-probs
are vLLM's raw ones (before any processor): the policy's own conditional distribution.

A twin missing from the batch or out of step (it could only happen if the scheduler
preempted one of the pair) leaves that code unguided; it is counted per sample in
`UNGUIDED_CODES` (the engine runs in this process) and the engine logs and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from rollout.rules import (Masks, SpanRules, SpanState, constrain_codes, constrain_row, draw, force_row,
                           initial_state)

RULES_KEY = "realsr_vlcot_rules"
GUIDE_KEY = "realsr_cfg"  # on a guided row: {"uid", "scale", "seed"}
TWIN_KEY = "realsr_cfg_twin"  # on a twin row: {"uid" of its sample, "end": image_end}

UNGUIDED_CODES: Dict[str, int] = {}  # sample uid -> image codes drawn without their twin

try:  # the logits-processor base class only exists where vLLM is installed
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - e.g. the IQA environment
    LogitsProcessor = object  # type: ignore[misc,assignment]


@dataclass
class Guide:
    uid: str
    scale: float
    temperature: float
    top_p: float
    generator: torch.Generator


@dataclass
class RuledRow:
    rules: SpanRules
    masks: Masks
    state: SpanState
    output_ids: List[int]  # vLLM's live list of the request's output tokens
    guide: Optional[Guide] = None


@dataclass
class TwinRow:
    uid: str
    end_token: int  # image_end: the twin's stop token, forced when its sample is gone or out of step
    prompt_len: int
    output_ids: List[int]

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.output_ids)


class VLCoTLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
    """The span rules on ruled rows; CFG between guided rows and their twins."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rules_cache: Dict[str, Tuple[SpanRules, Masks]] = {}
        self.rows: Dict[int, Union[RuledRow, TwinRow]] = {}  # batch index -> row

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and forbids tokens

    def _rules(self, key: str) -> Tuple[SpanRules, Masks]:
        if key not in self.rules_cache:
            rules = SpanRules.from_json(key)
            self.rules_cache[key] = (rules, Masks(rules, self.device))
        return self.rules_cache[key]

    def _row(self, params, prompt_ids, output_ids) -> Optional[Union[RuledRow, TwinRow]]:
        extra = (params.extra_args or {}) if params is not None else {}
        if TWIN_KEY in extra:
            t = extra[TWIN_KEY]
            return TwinRow(str(t["uid"]), int(t["end"]), len(prompt_ids or []), output_ids)
        key = extra.get(RULES_KEY)
        if key is None:
            return None
        rules, masks = self._rules(key)
        row = RuledRow(rules, masks, initial_state(prompt_ids or [], rules), output_ids)
        if GUIDE_KEY in extra:
            g = extra[GUIDE_KEY]
            gen = torch.Generator(device="cpu").manual_seed(int(g["seed"]))
            row.guide = Guide(str(g["uid"]), float(g["scale"]), float(params.temperature), float(params.top_p), gen)
        return row

    def update_state(self, batch_update: Optional["BatchUpdate"]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            row = self._row(params, prompt_ids, output_ids)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        twins = {row.uid: index for index, row in self.rows.items() if isinstance(row, TwinRow)}
        chosen: Dict[str, Tuple[int, int]] = {}  # uid -> (span length the token extends, token)
        code_rows: Dict[int, List[Tuple[int, RuledRow, Optional[torch.Tensor]]]] = {}  # by rules: index, row, guided
        for index, row in self.rows.items():  # every ruled row before any twin row is touched
            if not isinstance(row, RuledRow):
                continue
            self._feed(index, row)
            g, state = row.guide, row.state
            kind, forced = state.next_kind(row.rules)
            if kind != "codes":
                constrain_row(logits[index], state, row.rules, row.masks)
                if g is not None and kind == "force":
                    chosen[g.uid] = (state.span_len, forced)
                continue
            guided = None
            if g is not None:
                twin = twins.get(g.uid)
                if twin is not None and self.rows[twin].length == state.span_len:
                    uncond = logits[twin]
                    guided = uncond + g.scale * (logits[index] - uncond)
                else:
                    UNGUIDED_CODES[g.uid] = UNGUIDED_CODES.get(g.uid, 0) + 1
            code_rows.setdefault(id(row.rules), []).append((index, row, guided))
        for group in code_rows.values():
            self._constrain_codes(logits, group, chosen)
        for index, row in self.rows.items():
            if isinstance(row, TwinRow):
                length, token = chosen.get(row.uid, (-1, row.end_token))
                force_row(logits[index], token if length == row.length else row.end_token)
        return logits

    @staticmethod
    def _constrain_codes(logits: torch.Tensor, group: List[Tuple[int, "RuledRow", Optional[torch.Tensor]]],
                         chosen: Dict[str, Tuple[int, int]]) -> None:
        """All code rows of one rules in one pass; a guided row's token is drawn here and forced."""
        rows = torch.tensor([index for index, _, _ in group], device=logits.device)
        block = logits[rows]
        guided = None
        if any(gd is not None for _, _, gd in group):
            guided = torch.stack([block[j] if gd is None else gd for j, (_, _, gd) in enumerate(group)])
        first = group[0][1]
        top, ids = constrain_codes(block, first.rules, first.masks, guided)
        drawn = [j for j, (_, row, _) in enumerate(group) if row.guide is not None]
        if drawn:
            pick = torch.tensor(drawn, device=block.device)
            guides = [group[j][1].guide for j in drawn]
            tokens = draw(top[pick], ids[pick], [g.temperature for g in guides], [g.top_p for g in guides],
                          [g.generator for g in guides])
            for j, g, token in zip(drawn, guides, tokens):
                force_row(block[j], token)
                chosen[g.uid] = (group[j][1].state.span_len, token)
        logits[rows] = block

    @staticmethod
    def _feed(index: int, row: "RuledRow") -> None:
        state = row.state
        while state.consumed < len(row.output_ids):
            token = int(row.output_ids[state.consumed])
            if token < 0:
                raise RuntimeError(
                    f"VLCoT logits processor: output token {state.consumed} of batch row {index} is a placeholder "
                    f"({token}); vLLM's async scheduling is on, and the span rules need every sampled token. "
                    "Start the engine with async_scheduling=False (VLLMEngine does).")
            state.feed(token, row.rules)
