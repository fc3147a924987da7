"""What a GRPO step carries between the roles, as named types (no positional tuples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from rewards.types import RewardResult
from rollout.engine import Sample
from vlcot.trace import ParsedTrace


@dataclass
class ScoredSample:
    """One generated sample of a step: where it came from, what the policy wrote, how it scored."""

    record: int  # manifest index of its prompt
    group: int  # the prompt's position in the step; a prompt's G samples share it
    sample: Sample  # token ids, rollout log-probs, finish reason, policy version
    parsed: ParsedTrace
    reward: Optional[RewardResult] = None  # set once the reward pool has scored it


@dataclass
class StepResult:
    """Everything one step produced, for metrics, logging and checkpoints."""

    samples: List[ScoredSample]
    prompt_errors: int  # prompts the rollout engine refused (each logged with its reason)
    learn: Dict[str, float]  # learner metrics (rank 0, reduced over ranks)
    sync: Dict[str, float]  # weight-sync statistics
    batch_info: Dict[str, float] = field(default_factory=dict)  # advantage and sample-selection counts
    generate_s: float = 0.0
    reward_s: float = 0.0
