"""The rollout engine interface: G samples for each of B prompts, in-place weight updates.

Every sample carries its completion ids, the per-token log-probabilities under the raw
model distribution (temperature 1, before any decoding rule: what the learner's importance
correction compares against), the finish reason and the policy version that produced it.
A bad prompt yields a `PromptError` in its slot; the other prompts still generate.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from rollout.config import RolloutConfig
from rollout.rules import SpanRules


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str  # "stop" (the conversation's end token) | "length"
    version: int


@dataclass
class PromptError:
    prompt_index: int
    reason: str


Result = Union[List[Sample], PromptError]


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    last_tokens_per_s: float = 0.0
    cfg_twins: int = 0  # classifier-free guidance: unconditional branches started (one per sample and image)
    cfg_unguided_codes: int = 0  # image codes drawn without their unconditional branch (vLLM: twin out of step)

    def add_guidance(self, twins: int, unguided_codes: int) -> None:
        self.cfg_twins += twins
        self.cfg_unguided_codes += unguided_codes

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.calls += 1
        self.last_tokens_per_s = tokens / max(seconds, 1e-9)

    def as_dict(self) -> Dict[str, float]:
        return {"tokens": float(self.tokens), "seconds": self.seconds, "calls": float(self.calls),
                "tokens_per_s": self.tokens / max(self.seconds, 1e-9), "last_tokens_per_s": self.last_tokens_per_s,
                "cfg_twins": float(self.cfg_twins), "cfg_unguided_codes": float(self.cfg_unguided_codes)}


class RolloutEngine(ABC):
    def __init__(self, cfg: RolloutConfig, rules: SpanRules, layout, end_token_id: int):
        self.cfg = cfg
        self.rules = rules
        self.layout = layout
        self.end_token_id = end_token_id  # the conversation's end token: generation stops there
        self.version = 0
        self.throughput = Throughput()

    @property
    def max_new_tokens(self) -> int:
        s = self.cfg.sampling
        if s.max_new_tokens:
            return s.max_new_tokens
        return sum(self.rules.span_tokens(i) for i in range(len(self.rules.stage_grids))) + s.text_budget

    def check_prompt(self, prompt: Sequence[int]) -> Optional[str]:
        """Why a prompt cannot be generated from, or None."""
        if len(prompt) == 0:
            return "empty prompt"
        bad = [t for t in prompt if not 0 <= int(t) < self.rules.vocab_size]
        if bad:
            return f"token id {bad[0]} outside the vocabulary [0, {self.rules.vocab_size})"
        total = len(prompt) + self.max_new_tokens
        if total > self.cfg.max_model_len:
            return (f"prompt of {len(prompt)} tokens + max_new_tokens {self.max_new_tokens} = {total} exceeds "
                    f"max_model_len {self.cfg.max_model_len}")
        p = list(prompt)
        if self.layout.image_start not in p:
            return "prompt has no image span (the LR image is missing)"
        start = p.index(self.layout.image_start)
        end = p.index(self.layout.image_end, start) + 1 if self.layout.image_end in p[start:] else len(p)
        codes, why = self.layout.parse_image_span(p[start:end])
        if codes is None:
            return f"prompt image span is unusable: {why}"
        return None

    def generate(self, prompts: Sequence[Sequence[int]], n: Optional[int] = None, seed: Optional[int] = None,
                 greedy: bool = False) -> List[Result]:
        """For each prompt: n (default group_size) samples, or a PromptError."""
        n = n or self.cfg.group_size
        results: List[Optional[Result]] = [None] * len(prompts)
        good: List[int] = []
        for i, p in enumerate(prompts):
            why = self.check_prompt(p)
            if why is None:
                good.append(i)
            else:
                results[i] = PromptError(i, why)
        t0 = time.perf_counter()
        if good:
            generated = self._generate([list(map(int, prompts[i])) for i in good], n,
                                       self.cfg.seed if seed is None else seed, greedy)
            for i, samples in zip(good, generated):
                for s in samples:
                    s.prompt_index = i
                results[i] = samples
        tokens = sum(len(s.token_ids) for r in results if isinstance(r, list) for s in r)
        self.throughput.add(tokens, time.perf_counter() - t0)
        return results  # type: ignore[return-value]

    @abstractmethod
    def _generate(self, prompts: List[List[int]], n: int, seed: int, greedy: bool) -> List[List[Sample]]:
        """Valid prompts only; samples in prompt order."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int) -> int:
        """Load (name, tensor) pairs in place (HF checkpoint names); returns tensors loaded."""

    @abstractmethod
    def prompt_logprobs(self, sequences: List[List[int]]) -> List[List[float]]:
        """Teacher-forced log-probs of tokens 1..L-1 of each sequence."""

    @abstractmethod
    @abstractmethod
    def checkpoint_view(self) -> Dict[str, torch.Tensor]:
        """Every parameter of the loaded model under the checkpoint's (HF) names, unfused and
        unpacked: what a weight sync must have brought to the learner's values."""

    def get_parameter(self, name: str) -> Optional[torch.Tensor]:
        """A copy of one parameter by its HF name (None when the engine has no readable tensor
        of that name: vLLM's CPU backend repacks linear weights)."""

    def update_weights_from_path(self, path: str, version: int) -> None:
        """Reload every weight from an HF-layout safetensors directory."""
        from safetensors.torch import load_file
        from pathlib import Path

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        for f in files:
            self.update_weights(load_file(str(f)).items(), version)
