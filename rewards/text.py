"""The three text rewards as pure functions over a parsed trace.

Each returns (score in [0, 1], details dict). An invalid stage gives 0 with the stage's
reason in the details; nothing here raises on a malformed trace.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from vlcot.trace import LEVELS, SLOTS, STAGES, ParsedTrace

Details = Dict[str, object]


# ---- format -------------------------------------------------------------------------------
def format_reward(parsed: ParsedTrace, shaped: bool = False) -> Tuple[float, Details]:
    """Published: 1 if the whole response matches the seven tags in order, else 0.

    Shaped (off by default): the fraction of the seven stages that are valid and appear
    after the previous credited stage, walking the stages in their canonical order.
    """
    if not shaped:
        return float(parsed.strict_format), {"strict": parsed.strict_format}
    credited, last = [], -1
    for name in STAGES:
        st = parsed.stages.get(name)
        if st is not None and st.valid and st.position > last:
            credited.append(name)
            last = st.position
    return len(credited) / len(STAGES), {"strict": parsed.strict_format, "credited": credited}


# ---- degradation --------------------------------------------------------------------------
_LEVEL_SLOTS = {"blur", "noise", "compression"}


def degradation_reward(parsed: ParsedTrace, labels: Sequence[str], ordinal: bool = False) -> Tuple[float, Details]:
    """Fraction of the five slots whose word matches the label (paper: 3/5 = 0.6).

    Ordinal (off by default): a level slot earns 1 - |distance| / 3 on the
    none < light < medium < heavy scale (medium vs heavy = 2/3); resize slots stay exact.
    """
    stage = parsed.stages.get("degradation")
    if stage is None or not stage.valid:
        return 0.0, {"invalid": stage.reason if stage else "missing"}
    if len(labels) != 5:
        return 0.0, {"invalid": f"reference has {len(labels)} labels, expected 5"}
    per_slot: List[float] = []
    for slot, pred, ref in zip(SLOTS, parsed.degradation, labels):
        if pred == ref:
            per_slot.append(1.0)
        elif ordinal and slot in _LEVEL_SLOTS and pred in LEVELS and ref in LEVELS:
            per_slot.append(1.0 - abs(LEVELS.index(pred) - LEVELS.index(ref)) / (len(LEVELS) - 1))
        else:
            per_slot.append(0.0)
    return sum(per_slot) / 5.0, {"per_slot": dict(zip(SLOTS, per_slot)), "predicted": list(parsed.degradation)}


# ---- understanding ------------------------------------------------------------------------
_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "leaves": "leaf", "knives": "knife",
    "wolves": "wolf", "shelves": "shelf", "lives": "life", "wives": "wife", "halves": "half",
    "calves": "calf", "loaves": "loaf", "thieves": "thief", "oxen": "ox", "dice": "die",
    "nuclei": "nucleus", "cacti": "cactus", "fungi": "fungus", "glasses": "glass", "buses": "bus",
}
_NO_STRIP = {"glass", "grass", "dress", "bus", "gas", "lens", "species", "series", "news", "boss", "cross", "moss",
             "chess", "class", "mass", "canvas", "iris", "atlas", "bias", "this", "is", "was", "has", "his", "its",
             "us", "yes", "plus", "campus", "virus", "cactus", "nucleus", "status", "octopus"}


def singular(word: str) -> str:
    """A small English singulariser: irregular forms, -ies, -es after sibilants, -s."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _NO_STRIP or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zes", "sses")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def normalise_words(text: str) -> List[str]:
    return [singular(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def tag_found(tag: str, words: List[str]) -> bool:
    """A (possibly multi-word) tag appears as a contiguous run of normalised words."""
    target = normalise_words(tag)
    if not target:
        return False
    n = len(target)
    return any(words[i:i + n] == target for i in range(len(words) - n + 1))


def understanding_reward(
    parsed: ParsedTrace,
    tags: Sequence[str],
    matcher: Optional[Callable[[str, List[str]], List[bool]]] = None,
) -> Tuple[float, Details]:
    """Fraction of reference object tags mentioned in the rough-understanding text (paper:
    3/4 = 0.75); case-insensitive, singular/plural-normalised. With `matcher` (semantic
    mode), a tag missed literally may still be credited by the matcher (synonyms)."""
    stage = parsed.stages.get("rough_understand")
    if stage is None or not stage.valid:
        return 0.0, {"invalid": stage.reason if stage else "missing"}
    tags = [t for t in tags if t and t.strip()]
    if not tags:
        return 0.0, {"invalid": "no reference tags for this sample"}
    words = normalise_words(stage.text or "")
    found = [tag_found(t, words) for t in tags]
    if matcher is not None and not all(found):
        missed = [t for t, f in zip(tags, found) if not f]
        extra = iter(matcher(stage.text or "", missed))
        found = [f or next(extra) for f in found]
    return sum(found) / len(tags), {"found": [t for t, f in zip(tags, found) if f],
                                    "missed": [t for t, f in zip(tags, found) if not f]}
