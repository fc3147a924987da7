"""The VLCoT trace: prompt, serialisation to token ids, and parsing generated ids back.

A response has seven tagged stages in this order (images are VQ token spans):

    <degradation>medium blur, downsample, heavy noise, light compression, upsample</degradation>
    <rough_understand>...</rough_understand><rough_image>[span HR/4]</rough_image>
    <middle_understand>...</middle_understand><middle_image>[span HR/2]</middle_image>
    <final_understand>...</final_understand><final_image>[span HR]</final_image>

`parse_response` never raises: garbage, truncation and stray tokens all come back as
invalid stages with a reason. `strict_format_ok` is the published check: the whole
response, with each image span replaced by a placeholder, must fully match the seven tags
in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from vlcot.layout import TokenLayout

TEXT_STAGES = ("degradation", "rough_understand", "middle_understand", "final_understand")
IMAGE_STAGES = ("rough_image", "middle_image", "final_image")
STAGES = (
    "degradation",
    "rough_understand",
    "rough_image",
    "middle_understand",
    "middle_image",
    "final_understand",
    "final_image",
)
# Fraction of the HR side drawn at each image stage.
IMAGE_STAGE_SCALE = {"rough_image": 4, "middle_image": 2, "final_image": 1}

# The five degradation slots and their allowed words.
LEVELS = ("none", "light", "medium", "heavy")
RESIZES = ("downsample", "upsample", "keep")
SLOTS = ("blur", "resize", "noise", "compression", "final_resize")
SLOT_WORDS = {"blur": LEVELS, "resize": RESIZES, "noise": LEVELS, "compression": LEVELS, "final_resize": RESIZES}
_LEVEL_NOUN = {"blur": "blur", "noise": "noise", "compression": "compression"}

class TextCodec(Protocol):
    """What the trace code needs from a text tokenizer in one conversation format."""

    bos_token_id: int
    end_token_id: int  # ends a response (the conversation's end token)

    def prompt_around(self, image_span: List[int]) -> List[int]:
        """BOS + the user turn with `image_span` in place of the image + the response opener."""
        ...

    def encode_text(self, text: str) -> List[int]: ...

    def decode_text(self, ids: Sequence[int]) -> str: ...

    def is_text_token(self, token_id: int) -> bool: ...


# ---- degradation words -----------------------------------------------------------------
def degradation_text(labels: Sequence[str]) -> str:
    """Five canonical slot words -> the published sentence form."""
    if len(labels) != 5:
        raise ValueError(f"expected 5 degradation labels, got {len(labels)}")
    parts = []
    for slot, word in zip(SLOTS, labels):
        if word not in SLOT_WORDS[slot]:
            raise ValueError(f"degradation slot {slot!r}: {word!r} not in {SLOT_WORDS[slot]}")
        parts.append(f"{word} {_LEVEL_NOUN[slot]}" if slot in _LEVEL_NOUN else word)
    return ", ".join(parts)


def parse_degradation(text: str) -> Tuple[List[Optional[str]], str]:
    """Sentence -> five slot words (None where a slot does not parse) and a reason ("" if all ok)."""
    parts = [p.strip().lower() for p in text.strip().split(",")]
    words: List[Optional[str]] = [None] * 5
    problems = []
    if len(parts) != 5:
        problems.append(f"{len(parts)} items, expected 5")
    for i, slot in enumerate(SLOTS):
        if i >= len(parts):
            break
        part = parts[i]
        if slot in _LEVEL_NOUN:
            m = re.fullmatch(rf"(none|no|light|medium|heavy)\s+{_LEVEL_NOUN[slot]}", part)
            word = None if m is None else ("none" if m.group(1) == "no" else m.group(1))
        else:
            word = part if part in RESIZES else None
        if word is None:
            problems.append(f"{slot}: {part!r} not understood")
        words[i] = word
    return words, "; ".join(problems)


# ---- traces ----------------------------------------------------------------------------
@dataclass
class Trace:
    """A complete VLCoT response (what SFT trains on, what parsing recovers)."""

    degradation: List[str]
    rough_understand: str
    middle_understand: str
    final_understand: str
    rough_image: np.ndarray  # [h, w] VQ codes
    middle_image: np.ndarray
    final_image: np.ndarray


@dataclass
class Stage:
    name: str
    valid: bool
    reason: str = ""
    text: Optional[str] = None  # text stages
    codes: Optional[np.ndarray] = None  # image stages: [h, w] VQ codes
    position: int = -1  # character offset of the opening tag in the skeleton, -1 if absent


@dataclass
class ParsedTrace:
    stages: Dict[str, Stage]
    degradation: List[Optional[str]]  # five slot words, None where not parsed
    strict_format: bool  # the published full-match check
    skeleton: str  # decoded text with image spans as <image:k> placeholders
    finished: bool  # the conversation's end token was seen
    num_image_spans: int = 0
    num_image_tokens: int = 0
    num_text_tokens: int = 0

    @property
    def valid(self) -> bool:
        return self.strict_format and all(s.valid for s in self.stages.values())

    def invalid_reasons(self) -> Dict[str, str]:
        return {k: s.reason for k, s in self.stages.items() if not s.valid}

    def to_trace(self) -> Optional[Trace]:
        if not self.valid:
            return None
        s = self.stages
        return Trace(
            degradation=list(self.degradation),  # type: ignore[arg-type]
            rough_understand=s["rough_understand"].text or "",
            middle_understand=s["middle_understand"].text or "",
            final_understand=s["final_understand"].text or "",
            rough_image=s["rough_image"].codes,
            middle_image=s["middle_image"].codes,
            final_image=s["final_image"].codes,
        )


# ---- prompt and serialisation ----------------------------------------------------------
def build_prompt(lr_codes: np.ndarray, codec: TextCodec, layout: TokenLayout) -> List[int]:
    """The RL user prompt in the codec's conversation format, ending where the response starts."""
    return codec.prompt_around(layout.image_span(lr_codes))


def serialise_response(trace: Trace, codec: TextCodec, layout: TokenLayout, add_end: bool = True) -> List[int]:
    """A full trace -> response token ids (the SFT target after the prompt)."""
    ids: List[int] = []
    for stage in STAGES:
        ids += codec.encode_text(f"<{stage}>")
        if stage == "degradation":
            ids += codec.encode_text(degradation_text(trace.degradation))
        elif stage in IMAGE_STAGES:
            ids += layout.image_span(getattr(trace, stage))
        else:
            ids += codec.encode_text(getattr(trace, stage))
        ids += codec.encode_text(f"</{stage}>")
    if add_end:
        ids.append(codec.end_token_id)
    return ids


# ---- parsing ---------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"<image:(\d+)>")
_STRAY = "\ufffd"  # stands for a token that is neither text nor part of an image span
_NO_IMAGE = r"(?:(?!<image:).)*?"
_STRICT = re.compile(
    r"\s*"
    + r"\s*".join(
        rf"<{s}>\s*<image:\d+>\s*</{s}>" if s in IMAGE_STAGES else rf"<{s}>{_NO_IMAGE}</{s}>" for s in STAGES
    )
    + r"\s*",
    re.DOTALL,
)


def strict_format_ok(skeleton: str) -> bool:
    """Published format reward: the seven tags in order match the whole response."""
    return _STRICT.fullmatch(skeleton) is not None


def _split_spans(tokens: np.ndarray, layout: TokenLayout) -> List[Tuple[str, int, int]]:
    """Cut a token stream into ("text"|"image", start, end) runs; an unclosed span runs to the end."""
    runs: List[Tuple[str, int, int]] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i] == layout.image_start:
            ends = np.nonzero(tokens[i + 1 :] == layout.image_end)[0]
            j = i + 1 + int(ends[0]) + 1 if len(ends) else n
            runs.append(("image", i, j))
            i = j
        else:
            starts = np.nonzero(tokens[i:] == layout.image_start)[0]
            j = i + int(starts[0]) if len(starts) else n
            runs.append(("text", i, j))
            i = j
    return runs


def _decode_text_run(ids: np.ndarray, codec: TextCodec) -> Tuple[str, int]:
    """Decode a text run, replacing each run of non-text tokens by one stray marker."""
    pieces: List[str] = []
    buf: List[int] = []
    stray = 0
    for t in ids.tolist():
        if codec.is_text_token(t):
            buf.append(t)
            continue
        if buf:
            pieces.append(codec.decode_text(buf))
            buf = []
        if not pieces or not pieces[-1].endswith(_STRAY):
            pieces.append(_STRAY)
        stray += 1
    if buf:
        pieces.append(codec.decode_text(buf))
    return "".join(pieces), stray


def parse_response(
    token_ids: Sequence[int],
    codec: TextCodec,
    layout: TokenLayout,
    hr_size: Optional[int] = None,
) -> ParsedTrace:
    """Generated response ids -> ParsedTrace. With `hr_size`, image stages must have the
    resolution of their stage (rough HR/4, middle HR/2, final HR). Never raises."""
    try:
        tokens = np.asarray([int(t) for t in token_ids], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        return _empty_parse(f"token ids are not integers: {exc}")
    end_at = np.nonzero(tokens == codec.end_token_id)[0]
    finished = len(end_at) > 0
    if finished:
        tokens = tokens[: int(end_at[0])]

    skeleton_parts: List[str] = []
    spans: List[Tuple[Optional[np.ndarray], str]] = []
    n_img_tokens = n_text_tokens = 0
    for kind, a, b in _split_spans(tokens, layout):
        if kind == "image":
            spans.append(layout.parse_image_span(tokens[a:b]))
            skeleton_parts.append(f"<image:{len(spans) - 1}>")
            n_img_tokens += b - a
        else:
            text, _ = _decode_text_run(tokens[a:b], codec)
            skeleton_parts.append(text)
            n_text_tokens += b - a
    skeleton = "".join(skeleton_parts)

    stages: Dict[str, Stage] = {}
    degradation: List[Optional[str]] = [None] * 5
    for name in STAGES:
        stage, slots = _parse_stage(name, skeleton, spans, layout, hr_size)
        stages[name] = stage
        if slots is not None:
            degradation = slots
    if not finished:
        for st in stages.values():
            if not st.valid and ("missing" in st.reason or "not closed" in st.reason):
                st.reason += " (response ended without the end token: truncated?)"
    return ParsedTrace(
        stages=stages,
        degradation=degradation,
        strict_format=strict_format_ok(skeleton),
        skeleton=skeleton,
        finished=finished,
        num_image_spans=len(spans),
        num_image_tokens=n_img_tokens,
        num_text_tokens=n_text_tokens,
    )


def _parse_stage(name, skeleton, spans, layout, hr_size):
    m = re.search(rf"<{name}>(.*?)</{name}>", skeleton, re.DOTALL)
    if m is None:
        opened = skeleton.find(f"<{name}>")
        why = f"<{name}> is not closed" if opened >= 0 else f"missing <{name}>"
        return Stage(name, False, why, position=opened), None
    body, pos = m.group(1), m.start()
    if name in IMAGE_STAGES:
        found = _PLACEHOLDER.findall(body)
        if len(found) != 1 or _PLACEHOLDER.sub("", body).strip():
            return Stage(name, False, f"<{name}> must hold exactly one image span", position=pos), None
        codes, why = spans[int(found[0])]
        if codes is None:
            return Stage(name, False, why, position=pos), None
        if hr_size is not None:
            side = layout.codes_per_side(hr_size // IMAGE_STAGE_SCALE[name])
            if codes.shape != (side, side):
                return Stage(name, False, f"{name} is {codes.shape[0]}x{codes.shape[1]} codes, expected {side}x{side}",
                             codes=codes, position=pos), None
        return Stage(name, True, codes=codes, position=pos), None
    text = body.strip()
    if _PLACEHOLDER.search(body):
        return Stage(name, False, f"<{name}> contains an image span", text=text, position=pos), None
    if _STRAY in body:
        return Stage(name, False, f"<{name}> contains image or special tokens", text=text, position=pos), None
    if not text:
        return Stage(name, False, f"<{name}> is empty", text=text, position=pos), None
    if name == "degradation":
        words, why = parse_degradation(text)
        return Stage(name, not why, why, text=text, position=pos), words
    return Stage(name, True, text=text, position=pos), None


def _empty_parse(reason: str) -> ParsedTrace:
    return ParsedTrace(
        stages={s: Stage(s, False, reason) for s in STAGES},
        degradation=[None] * 5,
        strict_format=False,
        skeleton="",
        finished=False,
    )
