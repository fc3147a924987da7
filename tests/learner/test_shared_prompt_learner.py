"""The shared-prompt pass through the learner group (Ray actors, DeepSpeed on gloo, the tiny
policy in fp32): one SGD step on a grouped batch moves the weights as the separate passes do,
under ZeRO-2 and ZeRO-3 on two ranks, with gradient checkpointing, chunked log-probs and the
text/image token weights; the learner's log-probs are the same, and it reads each prompt once."""

import numpy as np
import pytest

from cluster.learner_group import LearnerGroup
from learner.config import GRPOConfig, LearnerConfig
from tests.learner.learner_steps import assert_same_update, trainable_names
from tests.learner.test_shared_prompt import grouped_batch

pytestmark = pytest.mark.slow

SGD = dict(lr=0.1, optimizer="sgd", grad_clip=1e9, logprob_chunk=5)


def _step(policy_dir, batch, mode, **cfg):
    group = LearnerGroup(LearnerConfig(num_workers=2, shared_prompt=mode, micro_batch_size=2, **SGD, **cfg), policy_dir)
    try:
        logp = group.logprobs(batch)
        metrics = group.grpo_step(batch)
        return group.shared_prompt, logp, metrics, group.full_state_dict()
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage,extra", [
    (2, dict(grpo=GRPOConfig(text_token_weight=3.0, image_token_weight=0.5))),
    (3, dict(gradient_checkpointing=True, grpo=GRPOConfig(loss_agg="token-mean"))),
])
def test_shared_prompt_step_equals_separate_passes(ray_local, policy_dir, tiny_policy, stage, extra):
    batch = grouped_batch(tiny_policy.layout, groups=2, g=3)  # 6 samples: a prompt's 3 on one rank
    start = {n: p.detach().numpy() for n, p in tiny_policy.model.named_parameters()}
    names = trainable_names(tiny_policy)
    on, logp_on, m_on, w_on = _step(policy_dir, batch, "on", zero_stage=stage, **extra)
    off, logp_off, m_off, w_off = _step(policy_dir, batch, "off", zero_stage=stage, **extra)
    assert on and not off
    mask = batch["loss_mask"] > 0
    assert np.abs(logp_on[mask] - logp_off[mask]).max() < 1e-5
    assert_same_update(w_on, w_off, start, names, 1e-5)
    for key in ("loss/policy", "entropy", "tokens/image", "tokens/text", "ratio_mean"):
        assert m_on[key] == pytest.approx(m_off[key], rel=1e-5, abs=1e-7), key
    # the separate passes read every row whole; the packs read each of the 2 prompts once
    prompt_tokens = int(batch["prompt_len"].sum())
    assert m_off["tokens/learner_forward"] == batch["attention_mask"].sum()
    assert m_on["tokens/learner_forward"] == batch["attention_mask"].sum() - prompt_tokens + 10 + 13
