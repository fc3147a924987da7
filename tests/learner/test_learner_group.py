"""Two CPU learner ranks as Ray actors under DeepSpeed (gloo), with the tiny policy."""

import functools

import numpy as np
import pytest
import ray

from cluster.learner_group import LearnerGroup
from comm.transport import WeightTransport, free_port
from learner.batch import pack_grpo
from learner.config import LearnerConfig
from tests.learner.learner_steps import assert_same_update, grpo_batch, one_step_state, trainable_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adam_on_one_rank(ray_local, policy_dir, tiny_policy):
    return one_step_state(policy_dir, tiny_policy.layout, 1, 2, lr=1e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_one_grpo_step_moves_every_trainable_parameter_and_ranks_agree(ray_local, policy_dir, tiny_policy, stage,
                                                                       adam_on_one_rank):
    group = LearnerGroup(LearnerConfig(num_workers=2, zero_stage=stage, lr=1e-3, micro_batch_size=1), policy_dir)
    try:
        before = group.full_state_dict()
        metrics = group.grpo_step(grpo_batch(tiny_policy.layout, 0))
        after = group.full_state_dict()
        unmoved = [n for n in trainable_names(tiny_policy) if np.array_equal(before[n], after[n])]
        assert not unmoved, unmoved
        frozen = [n for n, p in tiny_policy.model.named_parameters() if not p.requires_grad]
        assert frozen and all(np.array_equal(before[n], after[n]) for n in frozen)
        if stage == 2:  # each ZeRO-2 rank holds a whole copy: the copies agree (ZeRO-3's digests are of
            d = group.param_digests()  # one gathered tensor, equal by construction: checked below instead)
            assert d[0] == d[1]
        assert metrics["optimizer_steps"] == 1 and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        assert metrics["tokens/image"] == 4 * 10 and metrics["tokens/text"] == 4 * 3  # 9 codes + start, 3 text
        # rank invariance: the same step on one rank. Adam's first step is about lr x sign(gradient):
        # where a gradient is ~0 its fp32 summation order shows, hence 1e-2 (a lost micro-batch
        # still moves entries by ~lr)
        assert_same_update(after, adam_on_one_rank, before, trainable_names(tiny_policy), 1e-2)
    finally:
        group.shutdown()


def test_sgd_step_on_one_zero2_rank_equals_two_zero3_ranks(ray_local, policy_dir, tiny_policy):
    """With SGD and no clipping the update is the gradient itself, so a loss scaled by the world
    size, a wrongly all-reduced token denominator or a micro-batch's gradient lost (ZeRO-3
    accumulation) changes it; Adam's normalisation would divide a scale error away."""
    layout, names = tiny_policy.layout, trainable_names(tiny_policy)
    start = {n: p.detach().numpy() for n, p in tiny_policy.model.named_parameters()}
    sgd = dict(lr=0.1, optimizer="sgd", grad_clip=1e9)  # clipping would rescale a wrong gradient to the clip norm
    one = one_step_state(policy_dir, layout, 1, 2, **sgd)
    assert_same_update(one_step_state(policy_dir, layout, 2, 3, **sgd), one, start, names, 1e-3)


def test_kl_monitor_reports_the_distance_from_the_start_without_changing_the_update(ray_local, policy_dir, tiny_policy):
    from learner.config import GRPOConfig

    batch = grpo_batch(tiny_policy.layout, 0)
    states, kls = {}, []
    for monitor in (True, False):
        cfg = LearnerConfig(num_workers=2, zero_stage=2, lr=1e-3, grpo=GRPOConfig(kl_coef=0.0, kl_monitor=monitor))
        group = LearnerGroup(cfg, policy_dir)
        try:
            first = group.grpo_step(batch)
            states[monitor] = group.full_state_dict()
            if monitor:
                kls = [first["kl"], group.grpo_step(batch)["kl"]]
            else:
                assert "kl" not in first
        finally:
            group.shutdown()
    assert abs(kls[0]) < 1e-7  # the policy is still the reference when step 1 is scored
    assert kls[1] > 1e-5, kls  # after one update it has moved away
    # kl_coef 0: the monitored KL does not enter the loss, so step 1 updates the weights identically
    assert all(np.allclose(states[True][n], states[False][n], rtol=0, atol=1e-7) for n in states[False])


def _response_logp(model, prompt, response):
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logp[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum())


def test_grpo_step_raises_the_better_response_and_lowers_the_worse(ray_local, policy_dir, tiny_policy):
    """The whole learner path (packing, shifted log-probs, loss sign, ZeRO step) moves the
    policy towards the positive-advantage response of a group and away from the other."""
    import copy

    import torch

    layout = tiny_policy.layout
    rng = np.random.default_rng(7)
    prompt = [int(t) for t in rng.integers(3, 600, 12)]
    good = [int(t) for t in rng.integers(3, 600, 4)] + [layout.image_start] + [int(t) for t in rng.choice(layout.image_code_ids, 6)]
    bad = [int(t) for t in rng.integers(3, 600, 4)] + [layout.image_start] + [int(t) for t in rng.choice(layout.image_code_ids, 6)]
    model = copy.deepcopy(tiny_policy.model).float().eval()
    before = (_response_logp(model, prompt, good), _response_logp(model, prompt, bad))
    group = LearnerGroup(LearnerConfig(num_workers=2, zero_stage=2, lr=1e-3), policy_dir)
    try:
        group.grpo_step(pack_grpo([prompt, prompt], [good, bad], [1.0, -1.0], image_token_ids=layout.image_span_ids()))
        state = group.full_state_dict()
    finally:
        group.shutdown()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    after = (_response_logp(model, prompt, good), _response_logp(model, prompt, bad))
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[1] < before[1] - 1e-3, (before, after)


@ray.remote(num_cpus=0)
class Receiver:
    """Receiving end of the broadcast, as a rollout worker runs it."""

    def __init__(self, port, world):
        self.port, self.world = port, world

    def join(self):
        self.t = WeightTransport("127.0.0.1", self.port, 1, self.world)
        return True

    def receive(self):
        version, tensors = self.t.receive_all()
        return version, {k: v.numpy() for k, v in tensors.items()}


def test_broadcast_reaches_receivers_bit_for_bit(ray_local, policy_dir, tiny_policy):
    cfg = LearnerConfig(num_workers=2, zero_stage=3, lr=1e-3, bucket_mb=1)  # several buckets
    group = LearnerGroup(cfg, policy_dir)
    try:
        group.grpo_step(grpo_batch(tiny_policy.layout, 0))
        port = free_port()
        rx = Receiver.remote(port, 2)
        joins = group.join_weight_group(functools.partial(WeightTransport, "127.0.0.1", port, 0, 2)) + [rx.join.remote()]
        ray.get(joins)
        got = rx.receive.remote()
        stats = ray.get(group.broadcast_async(7))[0]
        version, tensors = ray.get(got)
        expected = group.full_state_dict()
        assert version == 7 and set(tensors) == set(expected)
        for name, arr in expected.items():
            assert tensors[name].dtype == arr.dtype and np.array_equal(tensors[name], arr), name
        assert stats["sync/buckets"] > 1 and stats["sync/bytes"] == sum(a.nbytes for a in expected.values())
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_exactly(ray_local, policy_dir, tiny_policy, tmp_path, stage):
    """Saved after 2 steps and loaded by a fresh group, 2 more steps end bit for bit where 4
    steps of one group do: weights, Adam's moments and the step counter are all restored."""
    cfg = LearnerConfig(num_workers=2, zero_stage=stage, lr=1e-3)
    straight = LearnerGroup(cfg, policy_dir)
    try:
        for s in range(4):
            straight.grpo_step(grpo_batch(tiny_policy.layout, s))
        want = straight.param_digests()[0]
    finally:
        straight.shutdown()
    first = LearnerGroup(cfg, policy_dir)
    try:
        for s in range(2):
            first.grpo_step(grpo_batch(tiny_policy.layout, s))
        first.save(str(tmp_path / "ckpt"), {"data_cursor": 2})
        saved = first.full_state_dict()
    finally:
        first.shutdown()
    resumed = LearnerGroup(cfg, policy_dir)
    try:
        state = resumed.load(str(tmp_path / "ckpt"))
        assert state["data_cursor"] == 2 and state["step_count"] == 2
        for s in range(2, 4):
            resumed.grpo_step(grpo_batch(tiny_policy.layout, s))
        assert resumed.param_digests()[0] == want
    finally:
        resumed.shutdown()
    # the HF half of the checkpoint loads in transformers and has the weights of step 2
    from vlcot.policy import load_policy

    hf = load_policy(tmp_path / "ckpt" / "hf")
    assert hf.layout == tiny_policy.layout
    got = {n: p.detach().numpy() for n, p in hf.model.named_parameters()}
    assert got.keys() == saved.keys()
    assert all(np.array_equal(got[n], saved[n]) for n in saved)
    assert not np.array_equal(saved["model.embed_tokens.weight"],
                              tiny_policy.model.model.embed_tokens.weight.detach().numpy())
