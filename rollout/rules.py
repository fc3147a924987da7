"""VLCoT decoding rules, shared by every engine.

A per-sequence state machine over generated tokens decides what may come next:

    text   -> anything but image-span internals; image_start only while fewer than
              `max_images` images were drawn
    grid_h -> the height grid token of this image's stage (rough, middle, final)
    grid_w -> the width grid token of this stage
    codes  -> image codes only, with entropy-adaptive top-k:
              k = round(k_min + (k_max - k_min) * sigmoid(clip(H) - center))
    newline after every `w` codes; image_end after the last row; back to text.

`constrain_row` applies the state to one row of logits in place; `constrain_codes` applies
the code rules to many rows at once. The vLLM logits processor and the HF engine both call
them, so the two engines follow the same rules; `draw` is how either picks a guided code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from rollout.config import SamplingConfig
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

    @classmethod
    def build(cls, layout, image_cfg, sampling: SamplingConfig, vocab_size: int,
              text_vocab_size: Optional[int] = None) -> "SpanRules":
        ids = np.sort(np.asarray(layout.image_code_ids))
        breaks = np.nonzero(np.diff(ids) != 1)[0]
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks + 1, [len(ids)]])
        ranges = tuple((int(ids[a]), int(ids[b - 1]) + 1) for a, b in zip(starts, ends))
        grids = tuple((image_cfg.hr_size // IMAGE_STAGE_SCALE[stage] // layout.patch_px,) * 2 for stage in IMAGE_STAGES)
        t = sampling.temperature
        return cls(
            image_start=layout.image_start, image_end=layout.image_end, row_newline=layout.row_newline,
            grid_base=layout.grid_base, max_grid=layout.max_grid, code_ranges=ranges,
            codes_per_patch=layout.patch_px // layout.downsample, stage_grids=grids, vocab_size=vocab_size,
            text_vocab_size=text_vocab_size or vocab_size,
            image_logit_scale=(t / sampling.image_temperature) if t > 0 else 1.0,
            text_greedy=sampling.text_greedy,
            topk_min=sampling.topk_min, topk_max=sampling.topk_max, entropy_center=sampling.entropy_center,
            entropy_lo=float(sampling.entropy_clip[0]), entropy_hi=float(sampling.entropy_clip[1]),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "SpanRules":
        d = json.loads(s)
        d["code_ranges"] = tuple(tuple(r) for r in d["code_ranges"])
        d["stage_grids"] = tuple(tuple(g) for g in d["stage_grids"])
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

    def feed(self, token: int, rules: SpanRules) -> None:
        self.consumed += 1
        if self.mode == "text":
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

    def next_kind(self, rules: SpanRules) -> Tuple[str, Optional[int]]:
        """('text' | 'codes' | 'force', forced token or None)."""
        if self.mode == "text":
            return "text", None
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
    for t in p[after:]:
        state.feed(int(t), rules)
    state.consumed = 0
    return state


def open_span(tokens: Sequence[int], state: SpanState) -> List[int]:
    """The tokens of the image span that `state` (fed with `tokens`, or with the prompt's tail)
    is inside, image_start first: the context of classifier-free guidance's unconditional
    branch. Empty in text."""
    return [int(t) for t in tokens[len(tokens) - state.span_len:]] if state.span_len else []


def draw(values: torch.Tensor, ids: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float],
         generators: Sequence[Optional[torch.Generator]]) -> List[int]:
    """One token per row from candidate logits `values` [R, K] (-inf = not allowed) naming the
    tokens `ids` [R, K]: the argmax where the temperature is 0, else a draw from
    softmax(values / temperature) within the top-p nucleus, by inverse CDF with one uniform
    number from the row's own generator. All rows in one pass."""
    tokens = ids.gather(1, torch.argmax(values, dim=-1, keepdim=True))[:, 0].tolist()
    drawn = [j for j, t in enumerate(temperature) if t > 0]
    if not drawn:
        return [int(t) for t in tokens]
    rows = torch.tensor(drawn, device=values.device)
    values, ids = values[rows], ids[rows]
    temps = torch.tensor([temperature[j] for j in drawn], device=values.device, dtype=torch.float64)[:, None]
    probs = torch.softmax(values.double() / temps, dim=-1)
    nucleus = torch.tensor([top_p[j] for j in drawn], device=values.device, dtype=torch.float64)[:, None]
    if bool((nucleus < 1.0).any()):  # the smallest set of the most likely tokens whose mass reaches top_p
        sp, si = torch.sort(probs, dim=-1, descending=True)
        sp = sp.masked_fill(torch.cumsum(sp, -1) - sp >= nucleus, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, si, sp)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor([float(torch.rand(1, generator=generators[j], dtype=torch.float64)) for j in drawn],
                     dtype=torch.float64).to(values.device)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=ids.shape[-1] - 1)
    for j, t in zip(drawn, ids.gather(1, picked)[:, 0].tolist()):
        tokens[j] = t
    return [int(t) for t in tokens]


def sample_row(row: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> int:
    """`draw` from one constrained row of logits [V]; its allowed (finite) tokens are the
    candidates."""
    allowed = torch.nonzero(torch.isfinite(row)).squeeze(-1)
    return draw(row[allowed][None], allowed[None], [temperature], [top_p], [generator])[0]


def force_row(row: torch.Tensor, token: int) -> torch.Tensor:
    """Only `token` stays possible (any sampler, greedy or not, then takes it)."""
    keep = row[token].clone()
    row.fill_(NEG)
    row[token] = keep if torch.isfinite(keep) else 0.0
    return row


def adaptive_k(entropy: float, rules: SpanRules) -> int:
    h = min(max(entropy, rules.entropy_lo), rules.entropy_hi)
    return int(round(rules.topk_min + (rules.topk_max - rules.topk_min) / (1.0 + math.exp(-(h - rules.entropy_center)))))


def constrain_row(row: torch.Tensor, state: SpanState, rules: SpanRules, masks: Masks,
                  guided: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply the rules to one row of logits [V] in place (and return it). `guided`, when
    given, replaces the image-code logits (classifier-free guidance) before top-k."""
    kind, token = state.next_kind(rules)
    if kind == "force":
        return force_row(row, token)
    if kind == "text":
        blocked = masks.text_blocked if state.images < len(rules.stage_grids) else masks.text_blocked_no_image
        row.masked_fill_(blocked, NEG)
        if rules.text_greedy:  # only the best allowed token survives: any sampler then takes it
            force_row(row, int(torch.argmax(row)))
        return row
    constrain_codes(row.unsqueeze(0), rules, masks, None if guided is None else guided.unsqueeze(0))
    return row


def constrain_codes(rows: torch.Tensor, rules: SpanRules, masks: Masks,
                    guided: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits [R, V] whose next token is an image code, in place: codes only, the image
    temperature, then each row's entropy-adaptive top-k. `guided` [R, V], when given, replaces
    the image-code logits first (classifier-free guidance). One pass for all rows: the vLLM
    processor hands it every code row of a step at once. Returns each row's kept codes as
    `draw` candidates: logits [R, K] (-inf past the row's k) and token ids [R, K]."""
    if guided is not None:
        rows.copy_(torch.where(masks.code, guided, rows))
    rows.masked_fill_(masks.not_code, NEG)
    if rules.image_logit_scale != 1.0:
        rows.mul_(rules.image_logit_scale)
    codes = rows[:, masks.code]
    logp = torch.log_softmax(codes.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    n = codes.shape[-1]
    ks = torch.tensor([min(adaptive_k(h, rules), n) for h in entropy.tolist()], device=rows.device)[:, None]
    top, where = torch.topk(codes, int(ks.max()), dim=-1)  # each row's k largest are its first k
    kth = top.gather(1, ks - 1)
    rows.masked_fill_(rows < kth, NEG)  # codes tied with the k-th all stay (in the candidates: up to max k)
    return top.masked_fill(top < kth, NEG), masks.code_ids[where]
