import math

import pytest
import torch

from learner.advantages import group_advantages
from learner.grpo import aggregate, kl_penalty, policy_loss, token_type_weights, truncated_is_weights
from learner.logprobs import selected_logprobs, sequence_logprobs


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    gi = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, stats = group_advantages(r, gi, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(0.5); group 1: all equal -> 0; group 2: mean 3, std sqrt(2)
    s0, s2 = math.sqrt(0.5), math.sqrt(2.0)
    torch.testing.assert_close(adv, torch.tensor([0.5 / s0, -0.5 / s0, 0, 0, -1 / s2, 1 / s2]))
    assert stats.num_groups == 3 and stats.zero_std_groups == 1
    dr, _ = group_advantages(r, gi, std_normalize=False)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, 0, 0, -1.0, 1.0]))


def test_identical_rewards_give_zero_advantage_and_no_gradient():
    adv, stats = group_advantages(torch.full((5,), 0.7), torch.zeros(5, dtype=torch.long))
    assert torch.equal(adv, torch.zeros(5)) and stats.zero_std_fraction == 1.0
    logp = torch.randn(5, 7, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(5, 7))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0


def test_permuting_within_groups_permutes_outputs():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g)
    gi = torch.arange(3).repeat_interleave(4)
    perm = torch.cat([torch.randperm(4, generator=g) + 4 * k for k in range(3)])
    a, _ = group_advantages(r, gi)
    b, _ = group_advantages(r[perm], gi[perm])
    torch.testing.assert_close(b, a[perm])
    logp, old, mask = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g), (torch.rand(12, 6, generator=g) > 0.3).float()
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        la, _ = policy_loss(logp, old, a, mask, mode=mode)
        lb, _ = policy_loss(logp[perm], old[perm], b, mask[perm], mode=mode)
        torch.testing.assert_close(la, lb)


def test_clipped_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old = 0
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # A = +1: -min(r, clip(r)) -> -[1.2, 0.5, 1.0]; A = -1: -min(-r, -clip(r)) = [1.5, 0.8, 1.0]
    pos, st = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    neg, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert pos.item() == pytest.approx(-(1.2 + 0.5 + 1.0) / 3)
    assert neg.item() == pytest.approx((1.5 + 0.8 + 1.0) / 3)
    assert st["clip_fraction"].item() == pytest.approx(1 / 3)
    # asymmetric clip (clip-higher): only the upper bound moves
    hi, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    assert hi.item() == pytest.approx(-(1.28 + 0.5 + 1.0) / 3)


def test_aggregation_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).float()
    assert aggregate(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 4))
    assert aggregate(v, m, "seq-mean-token-sum-norm", norm_tokens=10).item() == pytest.approx(10 / 20)
    assert aggregate(v, m, "token-mean", denominator=8).item() == pytest.approx(10 / 8)
    w = torch.tensor([[1.0, 1.0, 0.5, 1.0], [2.0, 1.0, 1.0, 1.0]])
    assert aggregate(v, m, "token-mean", weights=w).item() == pytest.approx((1 + 2 + 1.5 + 8) / (1 + 1 + 0.5 + 2))
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(v, m, "sum")


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    d = torch.tensor([[-0.5, 1.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(d) - d - 1)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(1, 2))


def test_truncated_importance_weights():
    old = torch.log(torch.tensor([0.5, 0.5, 0.1]))
    roll = torch.log(torch.tensor([0.25, 0.5, 0.5]))
    w = truncated_is_weights(old, roll, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([1.5, 1.0, 0.2]))
    assert not w.requires_grad


def test_token_type_weights():
    is_img = torch.tensor([[True, False]])
    assert token_type_weights(is_img, 1.0, 1.0) is None
    torch.testing.assert_close(token_type_weights(is_img, 1.0, 0.04), torch.tensor([[0.04, 1.0]]))


def test_chunked_logprobs_equal_naive_and_keep_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 101, (3, 37), generator=g)
    naive = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    chunked, ent = selected_logprobs(h, w, y, chunk=10, with_entropy=True)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    p = torch.softmax(h @ w.T, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), rtol=1e-4, atol=1e-4)
    gn = torch.autograd.grad(naive.sum(), (h, w))
    gc = torch.autograd.grad(chunked.sum(), (h, w))
    for a, b in zip(gn, gc):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sequence_logprobs_match_full_forward(tiny_policy):
    model = tiny_policy.model
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mine, _ = sequence_logprobs(model, ids, mask, start=5, chunk=7)
    torch.testing.assert_close(mine, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_registered_advantage_estimators_by_hand():
    from learner.advantages import ADVANTAGE_ESTIMATORS, estimate_advantages

    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"} <= set(ADVANTAGE_ESTIMATORS.names())
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 2.0, 4.0, 3.0])
    gi = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    # RLOO: r_i minus the mean of the other samples of its group
    rloo, stats = estimate_advantages("rloo", r, gi)
    want = [1 - 0, 0 - 1, 0, 0, 0, 2 - 3.5, 4 - 2.5, 3 - 3.0]
    torch.testing.assert_close(rloo, torch.tensor(want))
    assert stats.num_groups == 3 and stats.zero_std_groups == 1
    # REINFORCE++-baseline: group-centred, then one std over the whole batch
    centred = torch.tensor([0.5, -0.5, 0, 0, 0, -1.0, 1.0, 0.0])
    rpp, _ = estimate_advantages("reinforce_pp_baseline", r, gi, eps=0.0)
    torch.testing.assert_close(rpp, centred / centred.std())
    torch.testing.assert_close(estimate_advantages("dr_grpo", r, gi)[0], centred)
    torch.testing.assert_close(estimate_advantages("grpo", r, gi, eps=0.0)[0],
                               group_advantages(r, gi, eps=0.0)[0])
    with pytest.raises(ValueError, match=r"advantage estimator 'ppo' not in \['grpo'"):
        estimate_advantages("ppo", r, gi)


def test_per_reward_advantages_by_hand():
    """Each reward normalised in its group, weighted, summed, then scaled by the batch std: a
    reward with a small spread moves the advantage as much as a 0/1 one."""
    from learner.advantages import estimate_advantages, per_reward_advantages

    gi = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fmt = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # group 1: all 1, no signal
    deg = torch.tensor([0.4, 0.4, 0.6, 0.2, 0.4, 0.4, 0.4, 0.4])  # group 1 flat too
    comps = {"format": fmt, "degradation": deg}
    adv, stats = per_reward_advantages("grpo", comps, {"format": 1.0, "degradation": 2.0}, gi, eps=0.0)
    a_fmt = estimate_advantages("grpo", fmt, gi, eps=0.0)[0]
    a_deg = estimate_advantages("grpo", deg, gi, eps=0.0)[0]
    want = a_fmt + 2 * a_deg
    torch.testing.assert_close(adv, want / want.std())
    assert stats.num_groups == 2 and stats.zero_std_groups == 1
    assert adv[4:].abs().sum() == 0
    # the total would rank sample 2 above sample 0 only by 0.4; per reward it is by one deg std
    total = fmt + 2 * deg
    assert (adv[2] - adv[0]) / adv[:4].std() > (total[2] - total[0]) / total[:4].std()
    # a reward weighted 0 neither moves the advantage nor keeps its group from being flat
    only, stats = per_reward_advantages("grpo", comps, {"format": 0.0, "degradation": 1.0}, gi, eps=0.0)
    torch.testing.assert_close(only, a_deg / a_deg.std())
    assert stats.zero_std_groups == 1
    with pytest.raises(ValueError, match="at least one reward"):
        per_reward_advantages("grpo", {}, {}, gi)


def test_batch_advantages_follow_the_normalise_setting():
    from learner.advantages import batch_advantages, estimate_advantages, per_reward_advantages

    gi = torch.tensor([0, 0, 0, 1, 1, 1])
    comps = {"format": torch.tensor([1.0, 0, 1, 0, 0, 1]), "degradation": torch.tensor([0.2, 0.4, 0.4, 0.6, 0.2, 0.2])}
    weights = {"format": 1.0, "degradation": 1.0}
    total = comps["format"] + comps["degradation"]
    torch.testing.assert_close(batch_advantages("total", "rloo", total, comps, weights, gi)[0],
                               estimate_advantages("rloo", total, gi)[0])
    torch.testing.assert_close(batch_advantages("per_reward", "rloo", total, comps, weights, gi)[0],
                               per_reward_advantages("rloo", comps, weights, gi)[0])
    with pytest.raises(ValueError, match="normalise 'mean' not in"):
        batch_advantages("mean", "grpo", total, comps, weights, gi)


def test_registered_losses_and_kl():
    from learner.grpo import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    import numpy as np

    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    loss, st = POLICY_LOSSES.get("unclipped")(logp, old, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-(1.5 + 0.5 + 1.0) / 3) and st["clip_fraction"].item() == 0
    d = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(KL_ESTIMATORS.get("k2")(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])),
                               0.5 * d ** 2)
    # each aggregation owns its global denominator: the sum of the shards' equals the whole batch's
    lm = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=np.float32)
    w = lm * np.array([[1.0, 0.5, 1.0], [1, 1, 1], [2.0, 1, 1]], dtype=np.float32)
    for name, whole in (("token-mean", 3.5), ("seq-mean-token-mean", 2.0), ("seq-mean-token-sum-norm", 3 * 3)):
        agg = AGGREGATIONS.get(name)
        assert agg.local_denominator(lm, w, 3) == pytest.approx(whole), name
        parts = agg.local_denominator(lm[:1], w[:1], 3) + agg.local_denominator(lm[1:], w[1:], 3)
        assert parts == pytest.approx(whole), name
