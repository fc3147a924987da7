"""The trace's skeleton as decoding rules (`rollout.sampling.skeleton`, `infer.constrained`).

With the skeleton on, a response cannot leave the VLCoT format: the seven tags are written
by the rules, in order, and each image span starts where its tag opens, so every sample
reaches the final image at its size and ends with the conversation's end token. What the
policy still decides is the text inside each text stage and every image code.

The response becomes eight forced runs with a stage body between each two:

    run 0  <degradation>                                   body: text (budget)
    run 1  </degradation><rough_understand>                body: text
    run 2  </rough_understand><rough_image> image_start    body: the image span (span rules)
    run 3  </rough_image><middle_understand>               body: text
    ...
    run 7  </final_image> end_token

Each tag is encoded on its own, as `vlcot.trace.serialise_response` encodes it, so a forced
run is exactly what the SFT traces hold there. A text body ends when the policy writes the
first token of the next run (the rest of the run is then forced) or when its budget is
spent (the whole run is forced). A tag that is one token of its own (the project's format)
is never text inside a body, so a body cannot open or close a stage out of turn. The budgets split `sampling.text_budget` less the forced
tag tokens: the degradation sentence gets an eighth, each understanding stage a third of
the rest, so the response never exceeds the engine's token limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from vlcot.trace import IMAGE_STAGES, STAGES

MIN_TEXT_BODY = 4  # the fewest tokens a text stage may hold


@dataclass(frozen=True)
class Skeleton:
    runs: Tuple[Tuple[int, ...], ...]  # len(STAGES) + 1 forced runs
    budgets: Tuple[int, ...]  # per stage (STAGES order): the tokens its text body may hold (0 for images)
    tags: Tuple[int, ...]  # tokens that are a whole tag by themselves (none in BPE formats)
    prompt_tail: int  # prompt tokens after the LR image's span (the rest of the user turn, the opener)

    def text_tokens(self) -> int:
        """Forced tag tokens outside image spans (an image's image_start is counted in its span)."""
        return sum(len(r) for r in self.runs) - len(IMAGE_STAGES)


def forced_runs(codec, layout) -> Tuple[Tuple[int, ...], ...]:
    """The eight runs for one conversation format (`codec`) and token layout."""
    runs: List[List[int]] = []
    before: List[int] = []  # the previous stage's closing tag
    for stage in STAGES:
        run = before + list(codec.encode_text(f"<{stage}>"))
        if stage in IMAGE_STAGES:
            run.append(layout.image_start)
        runs.append(run)
        before = list(codec.encode_text(f"</{stage}>"))
    runs.append(before + [codec.end_token_id])
    return tuple(tuple(int(t) for t in r) for r in runs)


def build_skeleton(codec, layout, text_budget: int) -> Skeleton:
    """The skeleton with `text_budget` tokens of text in all (tags included). Too small a budget
    to hold the tags and a few words per stage is a ValueError naming the setting."""
    runs = forced_runs(codec, layout)
    forced = sum(len(r) for r in runs) - len(IMAGE_STAGES)
    text_stages = len(STAGES) - len(IMAGE_STAGES)
    free = text_budget - forced
    if free < MIN_TEXT_BODY * text_stages:
        raise ValueError(f"rollout.sampling.text_budget {text_budget} cannot hold the trace's skeleton: its tags take "
                         f"{forced} tokens in this conversation format and each of the {text_stages} text stages needs "
                         f"at least {MIN_TEXT_BODY}; set text_budget >= {forced + MIN_TEXT_BODY * text_stages}")
    first = max(MIN_TEXT_BODY, free // 8)  # the degradation sentence
    rest = (free - first) // (text_stages - 1)
    budgets = tuple(0 if s in IMAGE_STAGES else first if s == STAGES[0] else rest for s in STAGES)
    tags = sorted({t for stage in STAGES for tag in (f"<{stage}>", f"</{stage}>")
                   for t in [codec.encode_text(tag)] if len(t) == 1 for t in t})
    probe = list(codec.prompt_around([layout.image_start, layout.image_end]))
    prompt_tail = probe[::-1].index(layout.image_end)  # tokens after the (last) image_end
    return Skeleton(runs, budgets, tuple(int(t) for t in tags), prompt_tail)


# ---- the skeleton's part of a sequence's span state (rollout.rules.SpanState) ---------------
# `state.part` 2k = forcing run k, 2k + 1 = stage k's body; `state.pos` = tokens of that run or
# body so far; `state.off` = the tokens left the skeleton (only the span rules apply then).
def skeleton_feed(state, token: int, runs: Tuple[Tuple[int, ...], ...]) -> None:
    """Advance the skeleton over one token written in text."""
    k, body = divmod(state.part, 2)
    if k >= len(runs) or (body and k + 1 >= len(runs)):
        return
    if not body:  # inside forced run k
        if token != runs[k][state.pos]:
            state.off = True
            return
        state.pos += 1
    elif token == runs[k + 1][0]:  # the policy closed the text stage itself: the run goes on
        state.part, state.pos = state.part + 1, 1
    else:
        state.pos += 1
        return
    if state.pos == len(runs[state.part // 2]):
        state.part, state.pos = state.part + 1, 0


def skeleton_next(state, runs: Tuple[Tuple[int, ...], ...], budgets: Tuple[int, ...]) -> Optional[int]:
    """The token the skeleton forces next in text, or None where the policy writes."""
    if not runs or state.off:
        return None
    k, body = divmod(state.part, 2)
    if k >= len(runs) or (body and k + 1 >= len(runs)):  # the last run (the end token) is written
        return None
    if not body:
        return runs[k][state.pos]
    return runs[k + 1][0] if state.pos >= budgets[k] else None
