"""Two CPU learner ranks as Ray actors under DeepSpeed (gloo), with the tiny policy."""

import functools

import numpy as np
import pytest
import ray

from cluster.transport import WeightTransport, free_port
from learner.batch import pack_grpo
from learner.config import LearnerConfig
from cluster.learner_group import LearnerGroup

pytestmark = pytest.mark.slow


def grpo_batch(layout, step, n=4):
    rng = np.random.default_rng(100 + step)
    prompts = [list(rng.integers(3, 600, 12)) for _ in range(n)]
    responses = [list(rng.integers(3, 600, 3)) + [layout.image_start] + list(rng.choice(layout.image_code_ids, 9))
                 for _ in range(n)]
    adv = rng.normal(size=n)
    logps = [list(-rng.uniform(8, 11, len(r))) for r in responses]
    return pack_grpo(prompts, responses, adv, logps, image_token_ids=layout.image_span_ids())


def trainable_names(policy):
    return [n for n, p in policy.model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("stage", [2, 3])
def test_one_grpo_step_moves_every_trainable_parameter_and_ranks_agree(ray_local, policy_dir, tiny_policy, stage):
    group = LearnerGroup(LearnerConfig(num_workers=2, zero_stage=stage, lr=1e-3), policy_dir)
    try:
        before = group.full_state_dict()
        metrics = group.grpo_step(grpo_batch(tiny_policy.layout, 0))
        after = group.full_state_dict()
        unmoved = [n for n in trainable_names(tiny_policy) if np.array_equal(before[n], after[n])]
        assert not unmoved, unmoved
        frozen = [n for n, p in tiny_policy.model.named_parameters() if not p.requires_grad]
        assert frozen and all(np.array_equal(before[n], after[n]) for n in frozen)
        if stage == 2:  # each ZeRO-2 rank holds a whole copy: the copies agree (ZeRO-3's digests are of
            d = group.param_digests()  # one gathered tensor, equal by construction: the rank test checks it)
            assert d[0] == d[1]
        assert metrics["optimizer_steps"] == 1 and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        assert metrics["tokens/image"] == 4 * 10 and metrics["tokens/text"] == 4 * 3  # 9 codes + start, 3 text
    finally:
        group.shutdown()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_step_is_the_same_on_one_rank_two_ranks_and_under_zero3(ray_local, policy_dir, tiny_policy, optimizer):
    """The same batch, one GRPO step, on 1 ZeRO-2 rank, 2 ZeRO-2 ranks and 2 ZeRO-3 ranks: the
    same weights after it (fp32). With SGD the update is the gradient itself, so a loss scaled
    by the world size or a wrongly all-reduced token denominator changes it (Adam's first step
    divides the scale away; it is checked too)."""
    batch = grpo_batch(tiny_policy.layout, 0)
    lr = 0.1 if optimizer == "sgd" else 1e-3
    states = {}
    runs = ((1, 2), (2, 2), (2, 3)) if optimizer == "sgd" else ((1, 2), (2, 3))
    for ranks, stage in runs:
        group = LearnerGroup(LearnerConfig(num_workers=ranks, zero_stage=stage, lr=lr, optimizer=optimizer,
                                           micro_batch_size=1, grad_clip=1e9), policy_dir)  # no clipping: it
        # would rescale a wrongly scaled gradient back to the clip norm
        try:
            group.grpo_step(batch)
            states[ranks, stage] = group.full_state_dict()
        finally:
            group.shutdown()
    start = {n: p.detach().numpy() for n, p in tiny_policy.model.named_parameters()}
    one = states[1, 2]
    moved = max(float(np.abs(one[n] - start[n]).max()) for n in trainable_names(tiny_policy))
    assert moved > 1e-4  # the step did something to compare
    # Adam's first step is about lr x sign(gradient): where a gradient is ~0 its fp32 summation
    # order shows, so its bound is looser (a lost micro-batch still moves entries by ~lr)
    tol = 1e-3 if optimizer == "sgd" else 1e-2
    for key in runs[1:]:
        worst = max(float(np.abs(states[key][n] - one[n]).max()) for n in trainable_names(tiny_policy))
        assert worst < tol * moved, (optimizer, key, worst, moved)


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


def test_resume_continues_exactly(ray_local, policy_dir, tiny_policy, tmp_path):
    cfg = LearnerConfig(num_workers=2, zero_stage=2, lr=1e-3)
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
    # the HF half of the checkpoint loads in transformers and has the trained weights
    from vlcot.policy import load_policy

    hf = load_policy(tmp_path / "ckpt" / "hf")
    assert hf.layout == tiny_policy.layout
