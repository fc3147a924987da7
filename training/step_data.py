"""What a GRPO step carries between the roles, as named types (no positional tuples)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from rewards.types import RewardResult
from rollout.engine import PromptError, Result, Sample
from vlcot.trace import ParsedTrace


@dataclass
class CollectedRollout:
    """A step's generation once it is back from the rollout pool: what `_step` works from.

    In async mode the next step's generation is in flight when a checkpoint is written; it is
    collected then and stored with the checkpoint (`to_json`), so a resumed run trains on the
    very samples the killed one would have (drawn by the policy version before the checkpoint's,
    for the prompts the data cursor had already handed out)."""

    results: List[Result]  # per prompt, in prompt order: its samples, or the engine's refusal
    generate_s: float  # dispatch to results
    guidance: Dict[str, float]  # the generation's classifier-free-guidance counters
    worker_count: int  # rollout workers it was dispatched to
    lost_nodes: List[str] = field(default_factory=list)  # nodes of workers dropped while it ran

    def to_json(self) -> Dict[str, Any]:
        """The checkpoint's form (its keys "workers" and "lost" are the on-disk names of
        `worker_count` and `lost_nodes`, kept so earlier checkpoints resume)."""
        results = [{"error": asdict(r)} if isinstance(r, PromptError) else {"samples": [asdict(x) for x in r]}
                   for r in self.results]
        return {"results": results, "generate_s": self.generate_s, "guidance": self.guidance,
                "workers": self.worker_count, "lost": self.lost_nodes}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "CollectedRollout":
        results: List[Result] = [PromptError(**r["error"]) if "error" in r else [Sample(**x) for x in r["samples"]]
                                 for r in d["results"]]
        return cls(results, float(d["generate_s"]), dict(d["guidance"]), int(d["workers"]), list(d["lost"]))


@dataclass
class DispatchedStep:
    """A GRPO step whose prompts are out to the rollout pool (`rollout`), or already back
    (`collected`: a resumed async run's first step, read from its checkpoint)."""

    step: int  # 0-based
    records: List[int]  # manifest index of each prompt, in prompt order
    rollout: Optional[Any] = None  # cluster.rollout_pool.RolloutBatch while in flight
    collected: Optional[CollectedRollout] = None


@dataclass
class StepOutcome:
    """What one pass of the driver's step hands back: the step's result and the step that
    follows it if that one is already out to the rollout pool (async mode: dispatched as soon
    as this step's generation was collected; None in sync mode and after the last step)."""

    result: "StepResult"
    following: Optional[DispatchedStep] = None


@dataclass
class ScoredSample:
    """One generated sample of a step: where it came from, what the policy wrote, how it scored."""

    record: int  # manifest index of its prompt
    group: int  # the prompt's position in the step; a prompt's G samples share it
    sample: Sample  # token ids, rollout log-probs, finish reason, policy version
    parsed: ParsedTrace
    reward: RewardResult  # the reward pool's score (training/sample_scoring.py makes it whole)


@dataclass
class StepResult:
    """Everything one step produced, for metrics, logging and checkpoints."""

    samples: List[ScoredSample]
    prompt_errors: int  # prompts the rollout engine refused (each logged with its reason)
    learn: Dict[str, float]  # learner metrics (rank 0, reduced over ranks)
    sync: Dict[str, float]  # weight-sync statistics
    batch_metrics: Dict[str, float] = field(default_factory=dict)  # advantage, sample-selection and rollout counts
    generate_s: float = 0.0
    reward_s: float = 0.0
