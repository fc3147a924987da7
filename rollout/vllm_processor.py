"""vLLM's side of the VLCoT decoding: the span rules on every request carrying them, and
classifier-free guidance (CFG) across pairs of rows, written once (`VLCoTCore`) for both of
vLLM's logits-processor interfaces: the V1 one here (`VLCoTLogitsProcessor`: batch indices,
`BatchUpdate`, live output-token lists) and Model Runner V2's in
rollout/vllm_processor_v2.py (request slots, token history on the device).

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

A step reads nothing back from the device: the rows are classified from host state, their
indices go to the device in one non-blocking transfer, each kind of row is handled in one
batched op per rules (text masks, code rules and guidance, draws), and every forced row
(span tokens, greedy text, drawn codes, twins) gets its token in one final scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from rollout.rules import (NEG, Masks, SpanRules, SpanState, constrain_code_block, draw_tensor, force_rows,
                           initial_state, text_mask, to_device)

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
    state: SpanState  # None until the V2 adapter has read the prompt
    output_ids: List[int]  # the request's output tokens (V1: vLLM's live list; V2: read from the device)
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


class _Staged:
    """Host lists of indices and tokens gathered while a step is classified, moved to the
    device in one transfer (`to_device`: pinned and non-blocking on CUDA)."""

    def __init__(self):
        self.parts: List[List[int]] = []

    def add(self, values: List[int]) -> int:
        self.parts.append(values)
        return len(self.parts) - 1

    def commit(self, device) -> List[torch.Tensor]:
        flat = [v for part in self.parts for v in part]
        packed = to_device(flat, torch.long, device) if flat else torch.empty(0, dtype=torch.long, device=device)
        return list(torch.split(packed, [len(p) for p in self.parts]))


class VLCoTCore:
    """The span rules and CFG pairing for one step, whatever vLLM interface delivered the
    rows: the V1 adapter below and the V2 one (rollout/vllm_processor_v2.py) keep per-row host
    state and hand it here as (logits row, RuledRow) and (logits row, twin) pairs. A twin is
    anything with `uid`, `end_token` and `length` (its tokens so far, context included)."""

    def __init__(self, device):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rules_cache: Dict[str, Tuple[SpanRules, Masks]] = {}

    def rules(self, key: str) -> Tuple[SpanRules, Masks]:
        if key not in self.rules_cache:
            rules = SpanRules.from_json(key)
            self.rules_cache[key] = (rules, Masks(rules, self.device))
        return self.rules_cache[key]

    def ruled_row(self, params, prompt_ids: Optional[Sequence[int]], output_ids: List[int]) -> Optional[RuledRow]:
        """The row state of a request carrying `RULES_KEY` (None otherwise). `prompt_ids` None
        leaves the state unset (the V2 adapter sets it once it has read the prompt)."""
        extra = (params.extra_args or {}) if params is not None else {}
        key = extra.get(RULES_KEY)
        if key is None:
            return None
        rules, masks = self.rules(key)
        state = initial_state(prompt_ids, rules) if prompt_ids is not None else None
        row = RuledRow(rules, masks, state, output_ids)  # type: ignore[arg-type]
        if GUIDE_KEY in extra:
            g = extra[GUIDE_KEY]
            gen = torch.Generator(device="cpu").manual_seed(int(g["seed"]))
            row.guide = Guide(str(g["uid"]), float(g["scale"]), float(params.temperature), float(params.top_p), gen)
        return row

    @staticmethod
    def twin_args(params) -> Optional[Tuple[str, int]]:
        """(sample uid, end token) of a twin request, None for any other."""
        extra = (params.extra_args or {}) if params is not None else {}
        t = extra.get(TWIN_KEY)
        return None if t is None else (str(t["uid"]), int(t["end"]))

    def apply(self, logits: torch.Tensor, ruled: Sequence[Tuple[int, RuledRow]], twins: Sequence[Tuple[int, object]]
              ) -> torch.Tensor:
        """Every ruled row fed with its tokens so far; the twins with their lengths. In place."""
        twin_at = {tw.uid: (index, tw) for index, tw in twins}  # type: ignore[attr-defined]
        staged = _Staged()
        forced_rows, forced_tokens = [], []  # rows whose token is known on the host
        chosen: Dict[str, Tuple[int, int, int]] = {}  # uid -> (span length the token extends, host token, drawn slot)
        text: Dict[Tuple[int, int], List[int]] = {}
        text_rules: Dict[Tuple[int, int], Tuple[SpanRules, torch.Tensor]] = {}
        codes: Dict[int, List[Tuple[int, RuledRow, int]]] = {}  # by rules: (row, state, twin row or -1)
        for index, row in ruled:
            state, g = row.state, row.guide
            kind, forced = state.next_kind(row.rules)
            if kind == "force":
                forced_rows.append(index)
                forced_tokens.append(forced)
                if g is not None:
                    chosen[g.uid] = (state.span_len, forced, -1)
            elif kind == "text":
                blocked = text_mask(state, row.rules, row.masks)
                key = (id(row.rules), id(blocked))
                text.setdefault(key, []).append(index)
                text_rules[key] = (row.rules, blocked)
            else:
                twin = -1
                if g is not None:
                    found = twin_at.get(g.uid)
                    if found is not None and found[1].length == state.span_len:  # type: ignore[attr-defined]
                        twin = found[0]
                    else:
                        UNGUIDED_CODES[g.uid] = UNGUIDED_CODES.get(g.uid, 0) + 1
                codes.setdefault(id(row.rules), []).append((index, row, twin))
        # what each group needs on the device, all in one transfer
        h_forced = staged.add(forced_rows), staged.add(forced_tokens)
        h_text = {key: staged.add(rows) for key, rows in text.items()}
        h_codes = {}
        n_drawn = 0
        for key, group in codes.items():
            paired = [j for j, (_, _, tw) in enumerate(group) if tw >= 0]
            drawn = [j for j, (_, row, _) in enumerate(group) if row.guide is not None]
            for j in drawn:
                g = group[j][1].guide
                chosen[g.uid] = (group[j][1].state.span_len, -1, n_drawn)  # type: ignore[union-attr]
                n_drawn += 1
            h_codes[key] = (staged.add([index for index, _, _ in group]), staged.add(paired),
                            staged.add([group[j][2] for j in paired]), staged.add(drawn), paired, drawn)
        twin_rows, twin_host, twin_src = [], [], []
        for index, tw in twins:
            span, token, slot = chosen.get(tw.uid, (-1, tw.end_token, -1))  # type: ignore[attr-defined]
            ok = span == tw.length  # type: ignore[attr-defined]
            twin_rows.append(index)
            twin_host.append(token if ok and slot < 0 else tw.end_token)  # type: ignore[attr-defined]
            twin_src.append(slot if ok else -1)
        h_twin = staged.add(twin_rows), staged.add(twin_host), staged.add(twin_src)
        dev = staged.commit(logits.device)

        rows_out, tokens_out = [dev[h_forced[0]]], [dev[h_forced[1]]]
        for key, handle in h_text.items():  # masked; greedy text keeps only its argmax
            rules, blocked = text_rules[key]
            idx = dev[handle]
            block = logits.index_select(0, idx).masked_fill_(blocked, NEG)
            logits.index_copy_(0, idx, block)
            if rules.text_greedy:
                rows_out.append(idx)
                tokens_out.append(torch.argmax(block, dim=-1))
        drawn_tokens = []
        for key, group in codes.items():
            h_rows, h_paired, h_twins, h_drawn, paired, drawn = h_codes[key]
            rules, masks = group[0][1].rules, group[0][1].masks
            idx = dev[h_rows]
            block = logits.index_select(0, idx).index_select(1, masks.code_ids)
            if paired:  # classifier-free guidance on the code columns: uncond + s (cond - uncond)
                at = dev[h_paired]
                uncond = logits.index_select(0, dev[h_twins]).index_select(1, masks.code_ids)
                scale = torch.tensor([group[j][1].guide.scale for j in paired], dtype=torch.float32)  # type: ignore
                scale = to_device(scale, torch.float32, logits.device)[:, None]
                block.index_copy_(0, at, uncond + scale * (block.index_select(0, at) - uncond))
            top, ids = constrain_code_block(block, rules, masks)
            logits.index_fill_(0, idx, NEG)
            logits[idx[:, None], masks.code_ids[None, :]] = block
            if drawn:  # guided samples: the processor draws the code itself and forces it
                guides = [group[j][1].guide for j in drawn]
                if len(drawn) < len(group):
                    at = dev[h_drawn]
                    top, ids, idx = top.index_select(0, at), ids.index_select(0, at), idx.index_select(0, at)
                tokens = draw_tensor(top, ids, [g.temperature for g in guides], [g.top_p for g in guides],  # type: ignore
                                     [g.generator for g in guides])  # type: ignore[union-attr]
                rows_out.append(idx)
                tokens_out.append(tokens)
                drawn_tokens.append(tokens)
        if twins:  # each twin takes its sample's token when in step, else its end token
            tokens = dev[h_twin[1]]
            if drawn_tokens:
                src = dev[h_twin[2]]
                tokens = torch.where(src >= 0, torch.cat(drawn_tokens)[src.clamp(min=0)], tokens)
            rows_out.append(dev[h_twin[0]])
            tokens_out.append(tokens)
        return force_rows(logits, torch.cat(rows_out), torch.cat(tokens_out))

    @staticmethod
    def feed(index: int, row: RuledRow) -> None:
        """Advance a row's span state over the output tokens it has not seen yet."""
        state = row.state
        while state.consumed < len(row.output_ids):
            token = int(row.output_ids[state.consumed])
            if token < 0:
                raise RuntimeError(
                    f"VLCoT logits processor: output token {state.consumed} of batch row {index} is a placeholder "
                    f"({token}); vLLM's async scheduling is on, and the span rules need every sampled token. "
                    "Start the engine with async_scheduling=False (VLLMEngine does).")
            state.feed(token, row.rules)


class VLCoTLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
    """The V1 interface (`update_state(BatchUpdate)` + `apply(logits)`): rows keyed by batch
    index, vLLM's live output-token lists; everything else is `VLCoTCore`."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.core = VLCoTCore(device)
        self.rows: Dict[int, Union[RuledRow, TwinRow]] = {}  # batch index -> row

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and forbids tokens

    def _row(self, params, prompt_ids, output_ids) -> Optional[Union[RuledRow, TwinRow]]:
        twin = VLCoTCore.twin_args(params)
        if twin is not None:
            return TwinRow(twin[0], twin[1], len(prompt_ids or []), output_ids)
        return self.core.ruled_row(params, prompt_ids or [], output_ids)

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
        ruled, twins = [], []
        for index, row in self.rows.items():
            if isinstance(row, RuledRow):
                VLCoTCore.feed(index, row)
                ruled.append((index, row))
            else:
                twins.append((index, row))
        return self.core.apply(logits, ruled, twins)
