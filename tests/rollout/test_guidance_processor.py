"""The vLLM logits processor's classifier-free guidance on hand-made batches: the guided row
and its unconditional twin in one batch, without an engine (tests/rollout/test_guidance.py
runs it inside vLLM)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rollout.config import SamplingConfig
from rollout.rules import Masks, SpanRules, constrain_row, initial_state
from vlcot.trace import build_prompt

import vllm  # noqa: E402,F401  (the suite's environment has vLLM: its absence is a failure, not a skip)
from rollout.vllm_processor import (  # noqa: E402
    GUIDE_KEY, RULES_KEY, TWIN_KEY, UNGUIDED_CODES, TwinRow, VLCoTLogitsProcessor)

SCALE = 3.0


@pytest.fixture(scope="module")
def rules(tiny_cfg, tiny_policy):
    return SpanRules.build(tiny_policy.layout, tiny_cfg.image, SamplingConfig(), tiny_policy.model.config.vocab_size,
                           len(tiny_policy.tokenizer))


def batch(added=(), removed=(), moved=()):
    return SimpleNamespace(added=list(added), removed=list(removed), moved=list(moved))


def guided_params(rules, uid, temperature=0.0):
    return SimpleNamespace(temperature=temperature, top_p=1.0, extra_args={
        RULES_KEY: rules.to_json(), GUIDE_KEY: {"uid": uid, "scale": SCALE, "seed": 0}})


def twin_params(rules, uid):
    return SimpleNamespace(temperature=0.0, top_p=1.0, extra_args={TWIN_KEY: {"uid": uid, "end": rules.image_end}})


def pair(rules, tiny_policy, cond_out, twin_out, uid="s0"):
    """A processor holding a guided sample (its prompt ends where the rough image opens) at
    batch row 0 and its twin at row 1."""
    lay = tiny_policy.layout
    prompt = build_prompt(np.random.default_rng(0).integers(0, 16384, (16, 16)), tiny_policy.codec, lay)
    prompt = prompt + [lay.image_start]
    proc = VLCoTLogitsProcessor(None, torch.device("cpu"), False)
    proc.update_state(batch(added=[(0, guided_params(rules, uid), prompt, cond_out),
                                   (1, twin_params(rules, uid), [lay.image_start], twin_out)]))
    return proc, prompt


def code_logits(rules, tiny_policy, favour):
    """Random logits on two rows, plus a bias {row: {code: value}}."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, rules.vocab_size, generator=g)
    for row, bias in favour.items():
        for code, value in bias.items():
            logits[row, code] = value
    return logits


def test_a_code_is_drawn_from_the_guided_logits_and_forced_on_both_rows(rules, tiny_policy):
    lay = tiny_policy.layout
    grid = [rules.grid_base + rules.stage_grids[0][0], rules.grid_base + rules.stage_grids[0][1]]
    a, b = lay.image_code_ids[10], lay.image_code_ids[20]
    # cond prefers a; uncond prefers a even more, so guidance (s = 3) turns to b (far above the noise):
    # guided = uncond + 3 (cond - uncond): a -> 24 + 3 (20 - 24) = 12, b -> 10 + 3 (18 - 10) = 34
    logits = code_logits(rules, tiny_policy, {0: {a: 20.0, b: 18.0}, 1: {a: 24.0, b: 10.0}})
    raw = logits.clone()
    proc, prompt = pair(rules, tiny_policy, list(grid), list(grid), uid="aligned")
    out = proc.apply(logits)
    state = initial_state(prompt, rules)
    for t in grid:
        state.feed(t, rules)
    expected = constrain_row(raw[0].clone(), state, rules, Masks(rules, "cpu"), raw[1] + SCALE * (raw[0] - raw[1]))
    token = int(torch.argmax(expected))
    assert token == b and int(torch.argmax(constrain_row(raw[0].clone(), state, rules, Masks(rules, "cpu")))) == a
    for row in (0, 1):  # the twin takes its sample's token: its context stays the sample's
        assert torch.isfinite(out[row]).sum() == 1 and int(torch.argmax(out[row])) == b
    assert "aligned" not in UNGUIDED_CODES


def test_forced_span_tokens_are_forced_on_the_twin_too(rules, tiny_policy):
    grid_h = rules.grid_base + rules.stage_grids[0][0]
    proc, _ = pair(rules, tiny_policy, [grid_h], [grid_h], uid="forced")
    out = proc.apply(torch.randn(2, rules.vocab_size))
    grid_w = rules.grid_base + rules.stage_grids[0][1]
    assert all(int(torch.argmax(out[r])) == grid_w and torch.isfinite(out[r]).sum() == 1 for r in (0, 1))


def test_a_twin_out_of_step_leaves_the_code_unguided_counts_it_and_ends(rules, tiny_policy):
    lay = tiny_policy.layout
    grid = [rules.grid_base + rules.stage_grids[0][0], rules.grid_base + rules.stage_grids[0][1]]
    a, b = lay.image_code_ids[10], lay.image_code_ids[20]
    logits = code_logits(rules, tiny_policy, {0: {a: 20.0, b: 18.0}, 1: {a: 24.0, b: 10.0}})
    UNGUIDED_CODES.pop("late", None)
    proc, _ = pair(rules, tiny_policy, list(grid), grid[:1], uid="late")  # the twin is one token behind
    out = proc.apply(logits)
    assert int(torch.argmax(out[0])) == a  # the unguided choice
    assert UNGUIDED_CODES.pop("late") == 1
    assert int(torch.argmax(out[1])) == rules.image_end and torch.isfinite(out[1]).sum() == 1


def test_pairs_survive_the_batch_moving_and_swapping_rows(rules, tiny_policy):
    lay = tiny_policy.layout
    grid = [rules.grid_base + rules.stage_grids[0][0], rules.grid_base + rules.stage_grids[0][1]]
    a, b = lay.image_code_ids[10], lay.image_code_ids[20]
    cond_out = list(grid)
    proc, _ = pair(rules, tiny_policy, cond_out, list(grid), uid="moved")
    from vllm.v1.sample.logits_processor import MoveDirectionality

    proc.update_state(batch(moved=[(0, 1, MoveDirectionality.SWAP)]))  # now the twin is row 0
    assert isinstance(proc.rows[0], TwinRow)
    logits = code_logits(rules, tiny_policy, {1: {a: 20.0, b: 18.0}, 0: {a: 24.0, b: 10.0}})
    out = proc.apply(logits)
    assert int(torch.argmax(out[0])) == int(torch.argmax(out[1])) == b
    proc.update_state(batch(removed=[0]))  # the twin finished: the next code is unguided
    cond_out.append(b)
    UNGUIDED_CODES.pop("moved", None)
    proc.apply(torch.randn(2, rules.vocab_size))
    assert UNGUIDED_CODES.pop("moved") == 1
