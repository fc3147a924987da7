"""Grading the chain of thought that `infer` wrote, against the test set's labels and tags.

strict_format: the published full-match check, per tile. degradation_accuracy: fraction of
the five slots equal to the reference labels (an invalid degradation stage scores 0, as in
the reward), averaged over an image's tiles. tag_recall: fraction of reference object tags
found in the rough-understanding texts of all the image's tiles together (objects of a
large image can sit in different tiles), with the reward's word matching. fallback_rate:
fraction of tiles whose final image was malformed and replaced by bicubic (the image
metrics of a column with many fallbacks measure bicubic, not the model).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from rewards.text import normalise_words, tag_found

COT_METRICS = ("strict_format", "degradation_accuracy", "tag_recall", "fallback_rate")
COT_LABELS = {"strict_format": "Format rate↑", "degradation_accuracy": "Degradation acc.↑", "tag_recall": "Tag recall↑",
              "fallback_rate": "Fallback tiles↓"}
COT_HIGHER_BETTER = {"strict_format": True, "degradation_accuracy": True, "tag_recall": True, "fallback_rate": False}


def grade(record: Dict[str, Any], labels: Optional[Sequence[str]], tags: Optional[Sequence[str]]) -> Dict[str, Optional[float]]:
    """One infer record (cot JSON) -> {metric: value or None where no reference exists}."""
    tiles = record.get("tiles") or []
    out: Dict[str, Optional[float]] = {k: None for k in COT_METRICS}
    if not tiles:
        return out
    out["strict_format"] = float(np.mean([bool(t.get("strict_format")) for t in tiles]))
    out["fallback_rate"] = float(np.mean(["final_image" in (t.get("fallback") or []) for t in tiles]))
    if labels and len(labels) == 5:
        accs = []
        for t in tiles:
            pred = t.get("degradation") or [None] * 5
            valid = "error" not in t and "degradation" not in (t.get("invalid") or {})
            accs.append(sum(p == r for p, r in zip(pred, labels)) / 5.0 if valid else 0.0)
        out["degradation_accuracy"] = float(np.mean(accs))
    tags = [t for t in (tags or []) if t and t.strip()]
    if tags:
        words: List[str] = []
        for t in tiles:
            words += normalise_words((t.get("texts") or {}).get("rough_understand") or "") + ["|"]
        out["tag_recall"] = sum(tag_found(tag, words) for tag in tags) / len(tags)
    return out
