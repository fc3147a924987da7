"""The shared-prompt pass equals the separate passes: log-probs, entropy and gradients of the
tiny policy in fp32, through every registered loss aggregation, with text/image token weights,
chunked log-probs and gradient checkpointing; and the pack plan keeps a prompt's samples
together on one rank with every rank running the same number of packs."""

import copy

import numpy as np
import pytest
import torch

from cluster.config import load_config
from learner.batch import pack_grpo
from learner.config import LearnerConfig, problems
from learner.grpo import AGGREGATIONS, POLICY_LOSSES, token_type_weights
from learner.logprobs import sequence_logprobs, use_chunked_head
from learner.packing import plan_packs, prompt_groups
from learner.shared_prompt import (PACK_ATTENTION, PackSpans, build_pack, pack_logprobs, queries_once,
                                   resolve_shared_prompt, use_pack_attention)


def grouped_batch(layout, groups=2, g=3, seed=0):
    """`groups` prompts (of different lengths) with `g` responses each of different lengths, text
    then an image span, in the order the driver sends them (a group's samples together)."""
    rng = np.random.default_rng(seed)
    prompts, responses = [], []
    for k in range(groups):
        prompt = list(rng.integers(3, 600, 10 + 3 * k))
        for j in range(g):
            text = list(rng.integers(3, 600, 2 + j))
            prompts.append(prompt)
            responses.append(text + [layout.image_start] + list(rng.choice(layout.image_code_ids, 4 + 2 * j)))
    adv = rng.normal(size=len(prompts))
    logps = [list(-rng.uniform(8, 11, len(r))) for r in responses]
    return pack_grpo(prompts, responses, adv, logps, image_token_ids=layout.image_span_ids())


def _separate(model, batch, chunk, with_entropy=True):
    ids, am = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    return sequence_logprobs(model, ids, am, 0, chunk, 1.0, with_entropy)


LAYOUTS = {"rows": False, "response-queries": True}  # PackSpans' two attention layouts (learner/shared_prompt.py)


def _packed(model, batch, chunk, with_entropy=True, response_queries=False):
    """Every group as one pack, the results in the separate passes' [n, L - 1] layout."""
    n, cols = batch["loss_mask"].shape
    logp = torch.zeros(n, cols)
    ent = torch.zeros(n, cols)
    groups = prompt_groups(batch["input_ids"], batch["prompt_len"])
    for g in np.unique(groups):
        rows = np.nonzero(groups == g)[0]
        pack = build_pack(batch["input_ids"][rows], batch["attention_mask"][rows], batch["prompt_len"][rows], 0,
                          torch.device("cpu"), response_queries)
        assert (pack.spans.queries is not None) == response_queries
        lp, en = pack_logprobs(model, pack, (len(rows), cols), chunk, 1.0, with_entropy)
        logp = logp.index_put((torch.as_tensor(rows),), lp)
        if en is not None:
            ent = ent.index_put((torch.as_tensor(rows),), en)
    return logp, ent


@pytest.fixture(scope="module")
def fp32_policy(tiny_policy):
    """The tiny policy in fp32 with the pack attention installed (plain SDPA when no pack runs)."""
    model = copy.deepcopy(tiny_policy.model).float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    use_pack_attention(model)
    assert model.config._attn_implementation == PACK_ATTENTION
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunked_head", [False, True])
def test_pack_logprobs_and_entropy_equal_the_separate_passes(fp32_policy, tiny_policy, chunked_head, layout):
    """Response tokens only (prompt positions are not scored by the pack), in chunks of 5
    positions, in both attention layouts."""
    model = copy.deepcopy(fp32_policy)
    if chunked_head:
        assert use_chunked_head(model)
    batch = grouped_batch(tiny_policy.layout)
    with torch.no_grad():
        want, want_ent = _separate(model, batch, chunk=5)
        got, got_ent = _packed(model, batch, chunk=5, response_queries=LAYOUTS[layout])
    mask = torch.as_tensor(batch["loss_mask"]) > 0
    assert int(mask.sum()) > 40
    assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=0), float((got - want)[mask].abs().max())
    assert torch.allclose(got_ent[mask], want_ent[mask], atol=1e-5, rtol=0)
    assert not got[~mask].any()  # nothing outside the responses


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("agg", AGGREGATIONS.names())
@pytest.mark.parametrize("checkpointing", [False, True])
def test_pack_gradients_equal_the_separate_passes_for_every_aggregation(fp32_policy, tiny_policy, agg, checkpointing,
                                                                        layout):
    """The clipped GRPO loss with text weight 3 and image weight 0.5, old log-probs off the
    current ones (so ratios and clipping act): the gradient of the packed pass equals the
    separate passes' on every parameter, with and without gradient checkpointing, in both
    attention layouts."""
    model = copy.deepcopy(fp32_policy)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = grouped_batch(tiny_policy.layout, seed=1)
    mask = torch.as_tensor(batch["loss_mask"])
    adv = torch.as_tensor(batch["advantages"])
    tw = token_type_weights(torch.as_tensor(batch["is_image"]).bool(), 3.0, 0.5)
    old = None
    grads = {}
    for name, run in (("separate", _separate), ("packed", _packed)):
        model.zero_grad()
        kwargs = {"response_queries": LAYOUTS[layout]} if name == "packed" else {}
        logp, _ = run(model, batch, chunk=7, with_entropy=False, **kwargs)
        if old is None:
            old = (logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))) * mask
        loss, _ = POLICY_LOSSES.get("clipped")(logp, old, adv, mask, 0.02, 0.02, agg, tw, None, None,
                                              batch["loss_mask"].shape[1])
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["packed"].keys() == grads["separate"].keys() and len(grads["packed"]) > 10
    scale = max(float(g.abs().max()) for g in grads["separate"].values())
    assert scale > 1e-4
    worst = max(float((grads["packed"][n] - grads["separate"][n]).abs().max()) for n in grads["separate"])
    assert worst < 1e-5 * max(scale, 1.0), (worst, scale)


def test_a_pack_needs_the_pack_attention(tiny_policy):
    """A pack run through plain SDPA would let every response see the others: refused."""
    model = copy.deepcopy(tiny_policy.model).float()
    batch = grouped_batch(tiny_policy.layout)
    pack = build_pack(batch["input_ids"][:3], batch["attention_mask"][:3], batch["prompt_len"][:3], 0,
                      torch.device("cpu"))
    with pytest.raises(ValueError, match="pack attention"):
        pack_logprobs(model, pack, (3, batch["loss_mask"].shape[1]))


def test_a_pack_of_different_prompts_is_refused(tiny_policy):
    batch = grouped_batch(tiny_policy.layout)
    rows = np.array([0, 3])  # the first sample of each group
    with pytest.raises(ValueError, match="different prompts"):
        build_pack(batch["input_ids"][rows], batch["attention_mask"][rows], batch["prompt_len"][rows], 0,
                   torch.device("cpu"))


def test_plan_keeps_a_prompts_samples_on_one_rank_and_every_rank_runs_as_many_packs(tiny_policy):
    batch = grouped_batch(tiny_policy.layout, groups=4, g=3)  # 12 samples, 4 prompts
    ids, am, pl = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    groups = prompt_groups(ids, pl)
    assert list(groups) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    plans = plan_packs(ids, am, pl, 2)
    assert [p.packs for p in plans] == [2, 2]
    assert sorted(np.concatenate([p.rows for p in plans]).tolist()) == list(range(12))
    for plan in plans:
        for k in range(plan.packs):
            rows = plan.rows[plan.pack == k]
            assert len(rows) == 3 and len(set(groups[rows])) == 1  # a whole group per pack
    # 3 prompts of 2 samples over 2 ranks: one pack splits so both ranks run 2 packs, none mixes prompts
    three = grouped_batch(tiny_policy.layout, groups=3, g=2)
    groups = prompt_groups(three["input_ids"], three["prompt_len"])
    plans = plan_packs(three["input_ids"], three["attention_mask"], three["prompt_len"], 2)
    assert [p.packs for p in plans] == [2, 2]
    assert sorted(np.concatenate([p.rows for p in plans]).tolist()) == list(range(6))
    for plan in plans:
        assert all(len(set(groups[plan.rows[plan.pack == k]])) == 1 for k in range(plan.packs))


def test_plan_caps_pack_tokens_and_refuses_a_batch_the_ranks_cannot_share(tiny_policy):
    batch = grouped_batch(tiny_policy.layout, groups=1, g=4)
    ids, am, pl = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    lengths = am.sum(1) - pl
    cap = int(pl[0] + lengths[0] + lengths[1])  # room for the first two responses
    plan = plan_packs(ids, am, pl, 1, max_tokens=cap)[0]
    sizes = [int(pl[0] + lengths[plan.rows[plan.pack == k]].sum()) for k in range(plan.packs)]
    assert plan.packs >= 2 and max(sizes) <= cap
    with pytest.raises(ValueError, match="does not split over 3"):
        plan_packs(ids, am, pl, 3)


def test_shared_prompt_modes_resolve_by_attention_backend():
    assert resolve_shared_prompt("auto", "sdpa") and resolve_shared_prompt("on", "eager")
    assert not resolve_shared_prompt("auto", "flash_attention_2") and not resolve_shared_prompt("off", "sdpa")
    with pytest.raises(ValueError, match="flash_attention_2"):
        resolve_shared_prompt("on", "flash_attention_2")
    for word, on in (("off", False), ("on", True), ("auto", True)):  # YAML reads a bare on/off as a boolean
        cfg = load_config(None, [f"learner.shared_prompt={word}"]).learner
        assert resolve_shared_prompt(cfg.shared_prompt, "sdpa") is on, word
    found = dict(problems(LearnerConfig(shared_prompt="sometimes", pack_max_tokens=-1)))
    assert "sometimes" in found["learner.shared_prompt"] and "learner.pack_max_tokens" in found


def test_the_attention_layout_follows_the_device():
    """CUDA packs run the response-queries layout (flash runs its lower-right mask natively), CPU
    packs the rows layout (the lower-right mask is materialised there and runs slower)."""
    assert queries_once("cuda") and queries_once(torch.device("cuda", 1))
    assert not queries_once("cpu")
    spans = PackSpans.of(4, [(4, 5), (5, 8)], "cpu")
    assert spans.queries is None and spans.rows.tolist() == [[0, 1, 2, 3, 4, 0, 0], [0, 1, 2, 3, 5, 6, 7]]
    assert spans.back.tolist() == [0, 1, 2, 3, 4, 11, 12, 13]  # rows [G * 7] flattened, the prompt's from row 0
    spans = PackSpans.of(4, [(4, 5), (5, 8)], "cpu", response_queries=True)
    assert spans.queries.tolist() == [[4, 0, 0], [5, 6, 7]]
    assert spans.back.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]  # the prompt's outputs, then the queries' [G * 3]
