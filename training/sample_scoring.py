"""Rollout results -> parsed traces -> rewards, written once: the GRPO step and the held-out
check both turn what the rollout pool returned into ScoredSamples through `score_results`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from training.step_data import ScoredSample
from rewards.types import RewardInput
from rollout.engine import PromptError, Result
from vlcot.manifest import ManifestRecord
from vlcot.trace import parse_response


@dataclass
class RefusedPrompt:
    record: int  # manifest index of the prompt
    reason: str  # the rollout engine's


@dataclass
class ScoredResults:
    samples: List[ScoredSample]  # every sample of every prompt the engine took, parsed and scored
    refused: List[RefusedPrompt]  # prompts the engine refused (no samples)


def score_results(records: Sequence[int], results: Sequence[Result], manifest: Sequence[ManifestRecord], codec,
                  layout, hr_size: int, rewards, tag: str) -> ScoredResults:
    """`results[g]` are the samples of prompt `g` (manifest row `records[g]`) or the engine's
    refusal; each sample is parsed and all are scored in one call of `rewards` (the reward pool)
    against their row's labels, tags and HR image. Reward ids are `<tag>:<g>:<sample index>`."""
    parsed, refused = [], []
    for group, (record, res) in enumerate(zip(records, results)):
        if isinstance(res, PromptError):
            refused.append(RefusedPrompt(record, res.reason))
            continue
        for s in res:
            parsed.append((record, group, s, parse_response(s.token_ids, codec, layout, hr_size=hr_size)))
    inputs = [RewardInput(f"{tag}:{group}:{s.sample_index}", trace, manifest[record].degradation.labels,
                          manifest[record].tags, manifest[record].hr_path) for record, group, s, trace in parsed]
    scores = rewards.score(inputs) if inputs else []
    return ScoredResults([ScoredSample(record, group, s, trace, reward)
                          for (record, group, s, trace), reward in zip(parsed, scores)], refused)
