"""The learner options a published run switches on, each through the learner group (Ray
actors, DeepSpeed on gloo, the tiny policy): truncated importance sampling (on by default),
PPO epochs and minibatches with recomputed old log-probs, the KL term against a reference
that is not the start (ZeRO-2 and ZeRO-3), and SFT under ZeRO-3."""

import copy

import numpy as np
import pytest
import torch

from cluster.learner_group import LearnerGroup
from learner.config import GRPOConfig, LearnerConfig
from tests.learner.learner_steps import assert_same_update, grpo_batch, one_step, trainable_names

pytestmark = pytest.mark.slow

SGD = dict(lr=0.1, optimizer="sgd", grad_clip=1e9)  # the update is the gradient itself (no Adam, no clipping)


def test_truncated_importance_weights_scale_each_tokens_gradient(ray_local, policy_dir, tiny_policy):
    """With the rollout engine's log-probs set to the learner's own plus log 2, every token's
    importance weight is 1/2 and the SGD update is half of the update without weights; at
    minus log 4 the weight 4 is truncated to the cap 2 and the update doubles."""
    batch = grpo_batch(tiny_policy.layout, 0)
    start = {n: p.detach().numpy() for n, p in tiny_policy.model.named_parameters()}
    names = trainable_names(tiny_policy)
    group = LearnerGroup(LearnerConfig(num_workers=1, micro_batch_size=1, grpo=GRPOConfig(tis_cap=0.0), **SGD), policy_dir)
    try:
        learner_logp = group.logprobs(batch)
        m0 = group.grpo_step(batch)
        plain = group.full_state_dict()
    finally:
        group.shutdown()
    assert m0["is_weight_mean"] == 1.0
    scaled = {n: start[n] + 0.5 * (plain[n] - start[n]) for n in names}
    doubled = {n: start[n] + 2.0 * (plain[n] - start[n]) for n in names}
    for shift, want, mean in ((np.log(2.0), scaled, 0.5), (-np.log(4.0), doubled, 2.0)):
        shifted = dict(batch, rollout_logp=np.where(batch["loss_mask"] > 0, learner_logp + shift, 0).astype(np.float32))
        got, metrics = one_step(policy_dir, shifted, 1, 2, grpo=GRPOConfig(tis_cap=2.0), **SGD)
        assert metrics["is_weight_mean"] == pytest.approx(mean, rel=1e-5)
        assert_same_update(got, want, start, names, 1e-3)


def test_ppo_epochs_and_minibatches_compare_against_recomputed_old_logprobs(ray_local, policy_dir, tiny_policy):
    """2 epochs x 2 minibatches = 4 optimizer steps on one batch. From the second step on the
    policy has moved, so its ratio to the old (recomputed, pre-update) log-probs leaves 1 and
    the clip bites; without recomputation the "old" log-probs are the current ones and every
    ratio is exactly 1: the PPO clip would never act."""
    batch = grpo_batch(tiny_policy.layout, 0, n=8)
    ratios = {}
    for recompute in ("auto", "never"):
        grpo = GRPOConfig(ppo_epochs=2, minibatches=2, recompute_old_logp=recompute, clip_low=0.01, clip_high=0.01)
        _, metrics = one_step(policy_dir, batch, 1, 2, grpo=grpo, lr=3e-2)
        assert metrics["optimizer_steps"] == 4
        ratios[recompute] = (metrics["ratio_mean"], metrics["clip_fraction"])
    assert ratios["never"] == (pytest.approx(1.0, abs=1e-7), 0.0)
    assert abs(ratios["auto"][0] - 1.0) > 1e-4 and ratios["auto"][1] > 0.05, ratios


@pytest.fixture(scope="module")
def moved_reference(policy_dir, tiny_policy, tmp_path_factory):
    """A reference policy away from the start (every floating weight plus noise), saved as a
    policy folder: the KL term has something to pull towards."""
    ref = copy.deepcopy(tiny_policy)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return str(ref.save(tmp_path_factory.mktemp("reference") / "ref"))


@pytest.mark.parametrize("stage", [2, 3])
def test_kl_term_pulls_the_policy_towards_the_reference(ray_local, policy_dir, tiny_policy, moved_reference, stage):
    """Advantages 0 leave only the KL term: with kl_coef > 0 a step brings the policy closer to
    the reference (the KL measured before each of two steps falls); with kl_coef 0 (monitored
    only) nothing moves. Under ZeRO-3 the reference is a DeepSpeed engine of its own."""
    batch = grpo_batch(tiny_policy.layout, 0, advantages=np.zeros(4))
    kls = {}
    for coef in (1.0, 0.0) if stage == 2 else (1.0,):  # the kl_coef 0 control once
        cfg = LearnerConfig(num_workers=2, zero_stage=stage, micro_batch_size=1,
                            grpo=GRPOConfig(kl_coef=coef, kl_monitor=True), **SGD)
        group = LearnerGroup(cfg, policy_dir)
        try:
            assert group.set_reference(moved_reference)
            kls[coef] = [group.grpo_step(batch)["kl"] for _ in range(2)]
        finally:
            group.shutdown()
    assert kls[1.0][0] > 1e-3  # the reference is away from the start
    assert kls[1.0][1] < 0.99 * kls[1.0][0], kls
    if 0.0 in kls:
        assert kls[0.0][0] == pytest.approx(kls[1.0][0], rel=1e-6)  # the same distance before any step
        assert kls[0.0][1] == pytest.approx(kls[0.0][0], rel=1e-6)  # and no pull without the term

def test_sft_step_on_two_zero3_ranks_equals_one_zero2_rank(ray_local, policy_dir, tiny_policy):
    """SFT's cross-entropy under ZeRO-3 (the 7B path): the same SGD update and loss as one
    ZeRO-2 rank; a micro-batch's gradient lost or a denominator counted per rank would differ."""
    batch = grpo_batch(tiny_policy.layout, 0)
    start = {n: p.detach().numpy() for n, p in tiny_policy.model.named_parameters()}
    one, m1 = one_step(policy_dir, batch, 1, 2, step="sft_step", **SGD)
    two, m2 = one_step(policy_dir, batch, 2, 3, step="sft_step", **SGD)
    assert m2["loss/sft"] == pytest.approx(m1["loss/sft"], rel=1e-5)
    assert m1["loss/sft"] > 0.5 * np.log(tiny_policy.model.config.vocab_size)  # a random policy's, ~log(vocabulary)
    assert_same_update(two, one, start, trainable_names(tiny_policy), 1e-3)
