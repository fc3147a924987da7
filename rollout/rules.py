"""VLCoT decoding rules, shared by every engine.

A per-sequence state machine over generated tokens decides what may come next:

    text   -> anything but image-span internals; image_start only while fewer than
              `max_images` images were drawn
    grid_h -> the height grid token of this image's stage (rough, middle, final)
    grid_w -> the width grid token of this stage
    codes  -> image codes only, with entropy-adaptive top-k:
              k = round(k_min + (k_max - k_min) * sigmoid(clip(H) - center))
    newline after every `w` codes; image_end after the last row; back to text.

With `sampling.skeleton` the text between images follows the trace's skeleton too: the tags
are forced in order, each image span opens where its tag does, and the response ends after
the final image (rollout/skeleton.py).

`constrain_row` applies the state to one row of logits in place; `constrain_codes` applies
the code rules to many rows at once. The vLLM logits processor and the HF engine both call
them, so the two engines follow the same rules; `draw` is how either picks a guided code.
Nothing on the per-step path reads a device value back to the host: forcing, greedy text,
the adaptive k and the drawn tokens are tensor operations (`force_rows`, `draw_tensor`), so
a decode step on a GPU never waits for the processor's results.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from rollout.config import SamplingConfig
from rollout.skeleton import build_skeleton, skeleton_feed, skeleton_next
from vlcot.trace import IMAGE_STAGE_SCALE, IMAGE_STAGES

NEG = float("-inf")


@dataclass(frozen=True)
class SpanRules:
    image_start: int
    image_end: int
    row_newline: int
    grid_base: int
    max_grid: int
    code_ranges: Tuple[Tuple[int, int], ...]  # [start, end) runs of image-code ids
    codes_per_patch: int  # patch_px / downsample
    stage_grids: Tuple[Tuple[int, int], ...]  # (h, w) grid tokens per image of the response
    vocab_size: int
    text_vocab_size: int  # ids at or above are never text (padding rows, span tokens, codes)
    image_logit_scale: float = 1.0  # text temperature / image temperature
    text_greedy: bool = False  # text tokens: the argmax (image codes are still sampled)
    topk_min: int = 1
    topk_max: int = 2000
    entropy_center: float = 5.0
    entropy_lo: float = 0.0
    entropy_hi: float = 10.0
    skeleton_runs: Tuple[Tuple[int, ...], ...] = ()  # sampling.skeleton: forced tag runs (rollout/skeleton.py)
    skeleton_budgets: Tuple[int, ...] = ()  # tokens each stage's text body may hold
    skeleton_tags: Tuple[int, ...] = ()  # single-token tags: never text inside a body
    skeleton_prompt_tail: int = 0  # prompt tokens after the LR image (the response starts after them)

    @classmethod
    def build(cls, layout, image_cfg, sampling: SamplingConfig, vocab_size: int,
              text_vocab_size: Optional[int] = None, codec=None) -> "SpanRules":
        """The rules for one policy. `codec` (the conversation's text codec) is needed only with
        `sampling.skeleton`, to encode the tags."""
        ids = np.sort(np.asarray(layout.image_code_ids))
        breaks = np.nonzero(np.diff(ids) != 1)[0]
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks + 1, [len(ids)]])
        ranges = tuple((int(ids[a]), int(ids[b - 1]) + 1) for a, b in zip(starts, ends))
        grids = tuple((image_cfg.hr_size // IMAGE_STAGE_SCALE[stage] // layout.patch_px,) * 2 for stage in IMAGE_STAGES)
        t = sampling.temperature
        skeleton = None
        if sampling.skeleton:
            if codec is None:
                raise ValueError("sampling.skeleton needs the policy's text codec to encode the trace's tags")
            spans = sum((g[0] * layout.patch_px // layout.downsample) * (g[1] * layout.patch_px // layout.downsample + 1)
                        + 4 for g in grids)
            text = sampling.max_new_tokens - spans if sampling.max_new_tokens else sampling.text_budget
            skeleton = build_skeleton(codec, layout, text)
        return cls(
            image_start=layout.image_start, image_end=layout.image_end, row_newline=layout.row_newline,
            grid_base=layout.grid_base, max_grid=layout.max_grid, code_ranges=ranges,
            codes_per_patch=layout.patch_px // layout.downsample, stage_grids=grids, vocab_size=vocab_size,
            text_vocab_size=text_vocab_size or vocab_size,
            image_logit_scale=(t / sampling.image_temperature) if t > 0 else 1.0,
            text_greedy=sampling.text_greedy,
            topk_min=sampling.topk_min, topk_max=sampling.topk_max, entropy_center=sampling.entropy_center,
            entropy_lo=float(sampling.entropy_clip[0]), entropy_hi=float(sampling.entropy_clip[1]),
            skeleton_runs=skeleton.runs if skeleton else (), skeleton_budgets=skeleton.budgets if skeleton else (),
            skeleton_tags=skeleton.tags if skeleton else (), skeleton_prompt_tail=skeleton.prompt_tail if skeleton else 0,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "SpanRules":
        d = json.loads(s)
        d["code_ranges"] = tuple(tuple(r) for r in d["code_ranges"])
        d["stage_grids"] = tuple(tuple(g) for g in d["stage_grids"])
        d["skeleton_runs"] = tuple(tuple(r) for r in d.get("skeleton_runs", ()))
        d["skeleton_budgets"] = tuple(d.get("skeleton_budgets", ()))
        d["skeleton_tags"] = tuple(d.get("skeleton_tags", ()))
        return cls(**d)

    def span_tokens(self, stage: int) -> int:
        gh, gw = self.stage_grids[stage]
        h, w = gh * self.codes_per_patch, gw * self.codes_per_patch
        return h * (w + 1) + 4

    def is_code(self, t: int) -> bool:
        return any(a <= t < b for a, b in self.code_ranges)


class Masks:
    """Boolean masks over the vocabulary for one `SpanRules`, on one device."""

    def __init__(self, rules: SpanRules, device):
        v = rules.vocab_size
        code = torch.zeros(v, dtype=torch.bool)
        for a, b in rules.code_ranges:
            code[a:b] = True
        inner = code.clone()
        inner[[rules.image_end, rules.row_newline]] = True
        inner[rules.grid_base + 1: rules.grid_base + rules.max_grid + 1] = True
        inner[rules.text_vocab_size:] = True
        inner[rules.image_start] = False
        self.code = code.to(device)
        self.code_ids = torch.nonzero(code).squeeze(-1).to(device)  # the token id of each code column
        self.not_code = (~code).to(device)
        self.text_blocked = inner.to(device)  # never in text
        start = torch.zeros(v, dtype=torch.bool)
        start[rules.image_start] = True
        self.text_blocked_no_image = (inner | start).to(device)  # text after the last image
        # a skeleton's text body of stage k: no image_start, end token or single-token tag (its runs
        # write them), except the first token of run k + 1, with which the policy closes the stage
        self.skeleton_text = {}
        if rules.skeleton_runs:
            start[[rules.skeleton_runs[-1][-1], *rules.skeleton_tags]] = True
            for k, budget in enumerate(rules.skeleton_budgets):
                if budget:
                    body = inner | start
                    body[rules.skeleton_runs[k + 1][0]] = False
                    self.skeleton_text[k] = body.to(device)


@dataclass
class SpanState:
    """Where one sequence is in the image-span grammar; feed it every generated token."""

    mode: str = "text"  # text | grid_h | grid_w | codes
    images: int = 0  # images started so far
    h: int = 0
    w: int = 0
    row: int = 0
    col: int = 0
    consumed: int = 0  # tokens fed so far
    span_len: int = 0  # tokens of the open image span so far, image_start included (0 in text)
    # skeleton (rules.skeleton_runs): `part` 2k = forcing run k, 2k + 1 = stage k's body; `pos` =
    # tokens of that run or text body so far. `off`: the tokens left the skeleton (a prompt that
    # continues a partial trace differently), and only the span rules apply.
    part: int = 0
    pos: int = 0
    off: bool = False

    def feed(self, token: int, rules: SpanRules) -> None:
        self.consumed += 1
        if self.mode == "text":
            if rules.skeleton_runs and not self.off:
                skeleton_feed(self, token, rules.skeleton_runs)
            if token == rules.image_start:
                self.mode, self.span_len = "grid_h", 1
            return
        self.span_len += 1
        if self.mode == "grid_h":
            self.h = (token - rules.grid_base) * rules.codes_per_patch
            self.mode = "grid_w"
            return
        if self.mode == "grid_w":
            self.w = (token - rules.grid_base) * rules.codes_per_patch
            self.mode, self.row, self.col = "codes", 0, 0
            return
        # codes: rows of w codes, each ended by a newline, then image_end
        if self.row < self.h:
            if self.col < self.w:
                self.col += 1
            else:
                self.row, self.col = self.row + 1, 0
        else:
            self.mode, self.span_len = "text", 0
            self.images += 1
            if rules.skeleton_runs:  # the image was stage k's body: run k + 1 follows
                self.part, self.pos = self.part + 1, 0

    def next_kind(self, rules: SpanRules) -> Tuple[str, Optional[int]]:
        """('text' | 'codes' | 'force', forced token or None)."""
        if self.mode == "text":
            forced = skeleton_next(self, rules.skeleton_runs, rules.skeleton_budgets)
            return ("text", None) if forced is None else ("force", forced)
        stage = min(self.images, len(rules.stage_grids) - 1)
        if self.mode == "grid_h":
            return "force", rules.grid_base + rules.stage_grids[stage][0]
        if self.mode == "grid_w":
            return "force", rules.grid_base + rules.stage_grids[stage][1]
        if self.row < self.h:
            return ("codes", None) if self.col < self.w else ("force", rules.row_newline)
        return "force", rules.image_end


def initial_state(prompt: Sequence[int], rules: SpanRules) -> SpanState:
    """The state at the start of the response: the prompt's tokens after its first complete
    image span (the LR image) are fed, so a prompt may end inside the response, e.g. with
    `<final_image>` + image_start to continue a partial trace."""
    state = SpanState()
    p = list(prompt)
    try:
        after = p.index(rules.image_end) + 1
    except ValueError:
        return state
    response = after + rules.skeleton_prompt_tail  # the rest of the user turn is not the skeleton's
    for t in p[after:response]:
        state.feed(int(t), rules)
    state.part = state.pos = 0
    state.off = False
    for t in p[response:]:
        state.feed(int(t), rules)
    state.consumed = 0
    return state


def open_span(tokens: Sequence[int], state: SpanState) -> List[int]:
    """The tokens of the image span that `state` (fed with `tokens`, or with the prompt's tail)
    is inside, image_start first: the context of classifier-free guidance's unconditional
    branch. Empty in text."""
    return [int(t) for t in tokens[len(tokens) - state.span_len:]] if state.span_len else []


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list (or CPU tensor) on `device` without a host sync: on CUDA it goes
    through pinned memory with `non_blocking` (a plain `torch.tensor(list, device=cuda)`
    waits for the stream)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_tensor(values: torch.Tensor, ids: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row from candidate logits `values` [R, K] (-inf = not allowed) naming the
    tokens `ids` [R, K]: the argmax where the temperature is 0, else a draw from
    softmax(values / temperature) within the top-p nucleus, by inverse CDF with one uniform
    number from the row's own (CPU) generator. All rows in one pass; the tokens stay on the
    device ([R] long), so nothing waits for it (the generators run on the host)."""
    tokens = ids.gather(1, torch.argmax(values, dim=-1, keepdim=True))[:, 0]
    drawn = [j for j, t in enumerate(temperature) if t > 0]
    if not drawn:
        return tokens
    dev = values.device
    # one transfer: the rows' temperatures, nuclei and uniform numbers, and which rows they are
    u = torch.cat([torch.rand(1, generator=generators[j], dtype=torch.float64) for j in drawn])
    host = torch.stack([torch.tensor([temperature[j] for j in drawn], dtype=torch.float64),
                        torch.tensor([top_p[j] for j in drawn], dtype=torch.float64), u,
                        torch.tensor(drawn, dtype=torch.float64)])
    temps, nucleus, u, rows = to_device(host, torch.float64, dev)[:, :, None].unbind(0)
    every = len(drawn) == len(temperature)
    if not every:
        rows = rows[:, 0].long()
        values, ids = values[rows], ids[rows]
    probs = torch.softmax(values.double() / temps, dim=-1)
    if any(top_p[j] < 1.0 for j in drawn):  # the smallest set of the most likely tokens whose mass reaches top_p
        sp, si = torch.sort(probs, dim=-1, descending=True)
        sp = sp.masked_fill(torch.cumsum(sp, -1) - sp >= nucleus, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, si, sp)
    cdf = torch.cumsum(probs, dim=-1)
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last candidate with mass: u * total never passes it
    picked = torch.minimum(torch.searchsorted(cdf, u * cdf[:, -1:], right=True), last)
    chosen = ids.gather(1, picked)[:, 0]
    if every:
        return chosen
    return tokens.index_copy(0, rows, chosen)


def draw(values: torch.Tensor, ids: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
         generators: Sequence[Optional[torch.Generator]]) -> List[int]:
    """`draw_tensor` as a list of token ids (the HF engine's per-row path)."""
    return [int(t) for t in draw_tensor(values, ids, temperature, top_p, generators).tolist()]


def sample_row(row: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> int:
    """`draw` from one constrained row of logits [V]; its allowed (finite) tokens are the
    candidates."""
    allowed = torch.nonzero(torch.isfinite(row)).squeeze(-1)
    return draw(row[allowed][None], allowed[None], [temperature], [top_p], [generator])[0]


def force_rows(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows `rows` [N] of `logits` [B, V] keep only their token `tokens` [N] (its logit, or 0
    where it was -inf), in one scatter; nothing is read back to the host."""
    if rows.numel() == 0:
        return logits
    keep = logits[rows, tokens]
    logits.index_fill_(0, rows, NEG)
    logits[rows, tokens] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
    return logits


def force_row(row: torch.Tensor, token: Union[int, torch.Tensor]) -> torch.Tensor:
    """Only `token` stays possible (any sampler, greedy or not, then takes it). `token` is an
    int or a one-element tensor on the row's device; neither reads anything back to the host."""
    if isinstance(token, torch.Tensor):
        t = token.reshape(1)
        keep = row.gather(0, t)
        row.fill_(NEG)
        return row.scatter_(0, t, torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep)))
    keep = row[token].clone()
    row.fill_(NEG)
    row[token] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
    return row


def adaptive_k(entropy: float, rules: SpanRules) -> int:
    h = min(max(entropy, rules.entropy_lo), rules.entropy_hi)
    return int(round(rules.topk_min + (rules.topk_max - rules.topk_min) / (1.0 + math.exp(-(h - rules.entropy_center)))))


def adaptive_k_tensor(entropy: torch.Tensor, rules: SpanRules) -> torch.Tensor:
    """`adaptive_k` of every row's entropy [R] at once, on the device ([R] long): the same
    float64 arithmetic and the same round-half-to-even, without reading the entropies back."""
    h = entropy.double().clamp(rules.entropy_lo, rules.entropy_hi)
    span = float(rules.topk_max - rules.topk_min)
    return torch.round(rules.topk_min + span / (1.0 + torch.exp(-(h - rules.entropy_center)))).long()


def constrain_row(row: torch.Tensor, state: SpanState, rules: SpanRules, masks: Masks,
                  guided: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply the rules to one row of logits [V] in place (and return it). `guided`, when
    given, replaces the image-code logits (classifier-free guidance) before top-k."""
    kind, token = state.next_kind(rules)
    if kind == "force":
        return force_row(row, token)
    if kind == "text":
        row.masked_fill_(text_mask(state, rules, masks), NEG)
        if rules.text_greedy:  # only the best allowed token survives: any sampler then takes it
            force_row(row, torch.argmax(row))
        return row
    constrain_codes(row.unsqueeze(0), rules, masks, None if guided is None else guided.unsqueeze(0))
    return row


def text_mask(state: SpanState, rules: SpanRules, masks: Masks) -> torch.Tensor:
    """What a text position may not be: image-span internals, and image_start once every
    image was drawn (in a skeleton's text body: image_start and the end token, which its runs
    write)."""
    if rules.skeleton_runs and not state.off and state.part // 2 in masks.skeleton_text and state.part % 2:
        return masks.skeleton_text[state.part // 2]
    return masks.text_blocked if state.images < len(rules.stage_grids) else masks.text_blocked_no_image


def constrain_codes(rows: torch.Tensor, rules: SpanRules, masks: Masks,
                    guided: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits [R, V] whose next token is an image code, in place: codes only, the image
    temperature, then each row's entropy-adaptive top-k. `guided` [R, V], when given, replaces
    the image-code logits first (classifier-free guidance). One pass for all rows: the vLLM
    processor hands it every code row of a step at once. Returns each row's kept codes as
    `draw` candidates: logits [R, K] (-inf past the row's k) and token ids [R, K]."""
    codes = (rows if guided is None else guided).index_select(1, masks.code_ids)
    top, ids = constrain_code_block(codes, rules, masks)
    rows.fill_(NEG)
    rows.index_copy_(1, masks.code_ids, codes)
    return top, ids


def constrain_code_block(codes: torch.Tensor, rules: SpanRules, masks: Masks) -> Tuple[torch.Tensor, torch.Tensor]:
    """The code columns [R, n] (`masks.code_ids` order) of rows at an image-code position, in
    place: the image temperature and each row's entropy-adaptive top-k, all on the device.
    The k's stay a tensor: one top-k at min(topk_max, n), then each row masks past its own k
    (codes tied with a row's k-th all stay; candidates past the batch's largest k are -inf,
    as when the top-k was taken at that largest k). Returns the `draw` candidates."""
    if rules.image_logit_scale != 1.0:
        codes.mul_(rules.image_logit_scale)
    logp = torch.log_softmax(codes.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    n = codes.shape[-1]
    ks = adaptive_k_tensor(entropy, rules).clamp_(max=n)[:, None]
    top, where = torch.topk(codes, min(rules.topk_max, n), dim=-1)  # each row's k largest are its first k
    kth = top.gather(1, ks - 1)
    codes.masked_fill_(codes < kth, NEG)
    past = torch.arange(top.shape[-1], device=top.device)[None, :] >= ks.max()
    return top.masked_fill((top < kth) | past, NEG), masks.code_ids[where]
