"""A GRPO step's scored samples -> the learner's batch: the arithmetic between the reward pool
and the learner ranks (staleness filter, group advantages, sharding, packing), as one pure
function that the driver calls and tests call directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from learner.advantages import batch_advantages
from learner.batch import pack_grpo
from learner.config import GRPOConfig


@dataclass
class RolloutSamples:
    """What the learner needs of a step's scored samples, one entry per sample."""

    prompts: List[List[int]]  # the prompt's token ids
    responses: List[List[int]]  # the sampled token ids
    logprobs: List[List[float]]  # the rollout engine's log-prob of each sampled token
    groups: Sequence[int]  # the prompt's position in the step (a prompt's G samples share it)
    versions: Sequence[int]  # the policy version that drew the sample
    totals: Sequence[float]  # the weighted reward total
    components: Mapping[str, Sequence[float]]  # each reward's value (needed with normalise=per_reward)


@dataclass
class StepBatch:
    """The packed batch the learner ranks train on, and how it was chosen (step metrics)."""

    arrays: Dict[str, np.ndarray]  # learner.batch.pack_grpo's arrays
    metrics: Dict[str, float]  # step metrics: how the samples were chosen


def learner_batch(samples: RolloutSamples, version: int, grpo: GRPOConfig, reward_weights: Mapping[str, float],
                  max_staleness: int, ranks: int, pad_id: int, image_ids: Optional[np.ndarray]) -> StepBatch:
    """Samples more than `max_staleness` versions behind `version` are dropped; advantages are
    computed per group over the rest (`grpo.advantage`, `grpo.normalise`); the batch is cut to a
    multiple of the learner `ranks`, leaving out the samples with the smallest |advantage|."""
    lags = np.asarray(version, dtype=np.int64) - np.asarray(samples.versions, dtype=np.int64)
    keep = np.nonzero(lags <= max_staleness)[0]
    per_reward = ({k: torch.tensor([float(samples.components[k][i]) for i in keep]) for k in reward_weights}
                  if grpo.normalise == "per_reward" else {})
    adv, stats = batch_advantages(grpo.normalise, grpo.advantage,
                                  torch.tensor([float(samples.totals[i]) for i in keep]), per_reward, reward_weights,
                                  torch.tensor([int(samples.groups[i]) for i in keep]), grpo.adv_eps)
    n = len(keep) - len(keep) % ranks
    chosen = np.sort(np.argsort(np.abs(adv.numpy()), kind="stable")[::-1][:n])  # drop the least informative
    sel = keep[chosen]
    arrays = pack_grpo([samples.prompts[i] for i in sel], [samples.responses[i] for i in sel], adv.numpy()[chosen],
                       [samples.logprobs[i] for i in sel], pad_id, image_ids)
    metrics = {"adv/zero_std_fraction": stats.zero_std_fraction, "policy/version_lag": float(lags.mean()),
               "samples/stale_dropped": float(len(lags) - len(keep)), "samples/trained": float(n),
               "samples/dropped_for_sharding": float(len(keep) - n)}
    return StepBatch(arrays, metrics)
