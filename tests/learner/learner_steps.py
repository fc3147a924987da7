"""Helpers of the learner-group tests: a reproducible GRPO batch of the tiny policy, one step of
a fresh learner group, and the comparison of two updates."""

import numpy as np

from cluster.learner_group import LearnerGroup
from learner.batch import pack_grpo
from learner.config import LearnerConfig


def grpo_batch(layout, step, n=4, advantages=None):
    """Random prompts and responses (3 text tokens, an image start, 9 codes), advantages
    ~N(0, 1) unless given, rollout log-probs in [-11, -8]; seeded by `step`."""
    rng = np.random.default_rng(100 + step)
    prompts = [list(rng.integers(3, 600, 12)) for _ in range(n)]
    responses = [list(rng.integers(3, 600, 3)) + [layout.image_start] + list(rng.choice(layout.image_code_ids, 9))
                 for _ in range(n)]
    adv = rng.normal(size=n) if advantages is None else advantages
    logps = [list(-rng.uniform(8, 11, len(r))) for r in responses]
    return pack_grpo(prompts, responses, adv, logps, image_token_ids=layout.image_span_ids())


def trainable_names(policy):
    return [n for n, p in policy.model.named_parameters() if p.requires_grad]


def one_step(policy_dir, batch, ranks, stage, step="grpo_step", **cfg):
    """(full weights, metrics) after one `step` ("grpo_step" or "sft_step") of a fresh learner
    group on `batch`, in micro-batches of one sample (so every rank accumulates over several)."""
    group = LearnerGroup(LearnerConfig(num_workers=ranks, zero_stage=stage, micro_batch_size=1, **cfg), policy_dir)
    try:
        metrics = getattr(group, step)(batch)
        return group.full_state_dict(), metrics
    finally:
        group.shutdown()


def one_step_state(policy_dir, layout, ranks, stage, **cfg):
    """Full weights after one GRPO step on `grpo_batch(layout, 0)`."""
    return one_step(policy_dir, grpo_batch(layout, 0), ranks, stage, **cfg)[0]


def assert_same_update(got, want, start, names, tol):
    """`got` and `want` moved from `start` alike: their largest difference is below `tol` times
    the largest move (which must be real)."""
    moved = max(float(np.abs(want[n] - start[n]).max()) for n in names)
    assert moved > 1e-4  # the step did something to compare
    worst = max(float(np.abs(got[n] - want[n]).max()) for n in names)
    assert worst < tol * moved, (worst, moved)
