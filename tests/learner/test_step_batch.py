"""learner/step_batch.py, called directly: the advantage estimator and normalisation that one
config line selects reach the learner's batch; stale samples are dropped, counted and left out
of their group's advantages; the batch is cut to a multiple of the learner ranks."""

import numpy as np
import pytest
import torch

from cluster.config import load_config
from learner.advantages import batch_advantages, per_reward_advantages
from learner.step_batch import RolloutSamples, learner_batch


def rollout(totals, versions=None, components=None, tokens=None):
    """Two groups of four samples (prompts [1, 2, 3] and [1, 2, 4]), one response token each."""
    n = len(totals)
    return RolloutSamples([[1, 2, 3] if k < 4 else [1, 2, 4] for k in range(n)],
                          tokens or [[5, 6]] * n, [[-1.0] * len((tokens or [[5, 6]] * n)[k]) for k in range(n)],
                          [k // 4 for k in range(n)], versions or [0] * n, list(totals), components or {})


def batch_for(cfg, samples, version=0):
    return learner_batch(samples, version, cfg.learner.grpo, cfg.rewards.weights, cfg.trainer.max_staleness,
                         cfg.learner.num_workers, 0, np.array([], dtype=np.int64))


@pytest.mark.parametrize("estimator,want", [
    # rewards per group: [1, 0, 0.5, 0.5] and [2, 4, 3, 3]
    ("rloo", [1 - 1 / 3, 0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5, 2 - 10 / 3, 4 - 8 / 3, 3 - 3, 3 - 3]),
    ("dr_grpo", [0.5, -0.5, 0, 0, -1, 1, 0, 0]),
])
def test_one_config_line_selects_the_estimator(tmp_path, estimator, want):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"learner.grpo.advantage={estimator}", "rollout.group_size=4"])
    chosen = batch_for(cfg, rollout([1.0, 0.0, 0.5, 0.5, 2.0, 4.0, 3.0, 3.0]))
    np.testing.assert_allclose(chosen.arrays["advantages"], np.asarray(want, dtype=np.float32), atol=1e-6)
    assert chosen.metrics["samples/trained"] == 8


def test_per_reward_normalisation_reaches_the_learner_batch(tmp_path):
    """`learner.grpo.normalise=per_reward`: each reward's values (weighted as the config says)
    go to the estimator, not the total."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "learner.grpo.normalise=per_reward", "rollout.group_size=4"])
    names = list(cfg.rewards.weights)
    rng = np.random.default_rng(0)
    comps = [{n: float(rng.integers(0, 5)) / 4 for n in names} for _ in range(8)]
    totals = [sum(cfg.rewards.weights[n] * c[n] for n in names) for c in comps]
    chosen = batch_for(cfg, rollout(totals, components={n: [c[n] for c in comps] for n in names}))
    want, _ = per_reward_advantages("grpo", {n: torch.tensor([c[n] for c in comps]) for n in names},
                                    cfg.rewards.weights, torch.tensor([0] * 4 + [1] * 4))
    order = np.argsort(-np.abs(want.numpy()), kind="stable")[:len(chosen.arrays["advantages"])]
    np.testing.assert_allclose(chosen.arrays["advantages"], want.numpy()[np.sort(order)], atol=1e-6)


@pytest.mark.parametrize("max_staleness,dropped", [(1, [4, 5]), (2, [])])
def test_samples_too_many_versions_behind_are_dropped_counted_and_left_out_of_the_advantages(
        tmp_path, max_staleness, dropped):
    """Async mode: at learner version 3 with `trainer.max_staleness` 1, samples drawn by version
    1 are dropped (counted), and the group's advantages come from its fresh samples only."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "rollout.group_size=4", "learner.num_workers=1",
                             f"trainer.max_staleness={max_staleness}"])
    rewards, versions = [1.0, 0.0, 0.5, 0.25, 2.0, 5.0, 3.0, 4.0], [3, 3, 2, 2, 1, 1, 3, 3]
    chosen = batch_for(cfg, rollout(rewards, versions, tokens=[[10 + k] for k in range(8)]), version=3)
    kept = [k for k in range(8) if k not in dropped]
    info = chosen.metrics
    assert info["samples/stale_dropped"] == len(dropped) and info["samples/trained"] == len(kept)
    assert info["policy/version_lag"] == pytest.approx(np.mean([3 - v for v in versions]))
    assert sorted(chosen.arrays["input_ids"][:, 3] - 10) == kept  # each sample's one response token names it
    want, _ = batch_advantages("total", "grpo", torch.tensor([rewards[k] for k in kept]), {}, cfg.rewards.weights,
                               torch.tensor([k // 4 for k in kept]), cfg.learner.grpo.adv_eps)
    np.testing.assert_allclose(chosen.arrays["advantages"], want.numpy(), atol=1e-6)


def test_the_batch_is_a_multiple_of_the_ranks_without_the_least_informative_samples(tmp_path):
    """Two learner ranks, 6 fresh samples of which one group has advantage 0: 6 stays 6; with 7
    samples the one with the smallest |advantage| is left out (counted)."""
    cfg = load_config(None, [f"run_dir={tmp_path}", "rollout.group_size=4", "learner.num_workers=2"])
    rewards = [1.0, 0.0, 0.5, 0.7, 2.0, 2.0, 3.0]  # group 1: [2, 2, 3]
    chosen = batch_for(cfg, rollout(rewards, tokens=[[10 + k] for k in range(7)]))
    assert chosen.metrics["samples/trained"] == 6 and chosen.metrics["samples/dropped_for_sharding"] == 1
    full, _ = batch_advantages("total", "grpo", torch.tensor(rewards), {}, cfg.rewards.weights,
                               torch.tensor([k // 4 for k in range(7)]), cfg.learner.grpo.adv_eps)
    least = int(np.argmin(np.abs(full.numpy())))
    assert least not in set(chosen.arrays["input_ids"][:, 3] - 10)
