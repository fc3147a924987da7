import math

import numpy as np
import pytest
import torch

from rollout.config import RolloutConfig, SamplingConfig, problems
from rollout.rules import (Masks, SpanRules, SpanState, adaptive_k, constrain_codes, constrain_row, draw,
                           initial_state, open_span, sample_row)


@pytest.fixture(scope="module")
def rules(tiny_cfg, tiny_policy):
    return SpanRules.build(tiny_policy.layout, tiny_cfg.image, SamplingConfig(), tiny_policy.model.config.vocab_size,
                           len(tiny_policy.tokenizer))


def split_spans(tokens, layout):
    spans, i = [], 0
    while layout.image_start in tokens[i:]:
        s = tokens.index(layout.image_start, i)
        e = tokens.index(layout.image_end, s) + 1 if layout.image_end in tokens[s:] else None
        if e is None:
            break
        spans.append(tokens[s:e])
        i = e
    return spans


def test_random_logits_always_give_valid_spans_in_stage_order(rules, stage_sides, tiny_policy):
    layout = tiny_policy.layout
    masks = Masks(rules, "cpu")
    g = torch.Generator().manual_seed(0)
    state, out = SpanState(), []
    bias = torch.zeros(rules.vocab_size)
    bias[layout.image_start] = 8.0  # make images start often
    for _ in range(1500):
        row = torch.randn(rules.vocab_size, generator=g) * 3 + bias
        constrain_row(row, state, rules, masks)
        tok = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
        out.append(tok)
        state.feed(tok, rules)
    spans = split_spans(out, layout)
    assert len(spans) == 3  # rough, middle, final; then image_start is blocked
    for span, side in zip(spans, stage_sides.values()):  # rough, middle, final
        codes, why = layout.parse_image_span(span)
        assert why == "" and codes.shape == (side, side)
    text = [t for t in out if not layout.is_image_code([t])[0]]
    assert all(t < len(tiny_policy.tokenizer) or t in layout.image_span_ids() for t in text)
    assert state.images == 3 and state.mode == "text"


def test_adaptive_k_formula(rules):
    assert adaptive_k(5.0, rules) == round(1 + 1999 * 0.5)
    assert adaptive_k(-3.0, rules) == round(1 + 1999 / (1 + math.exp(5)))  # H clipped to 0
    assert adaptive_k(99.0, rules) == round(1 + 1999 / (1 + math.exp(-5)))  # H clipped to 10


def test_topk_keeps_k_codes(rules, tiny_policy):
    masks = Masks(rules, "cpu")
    state = SpanState(mode="codes", h=4, w=4)
    peaked = torch.randn(rules.vocab_size, generator=torch.Generator().manual_seed(0)) * 0.1 - 50.0
    peaked[list(tiny_policy.layout.image_code_ids[:3])] = torch.tensor([10.0, 9.0, 8.0])
    row = constrain_row(peaked.clone(), state, rules, masks)
    kept = torch.isfinite(row).sum().item()
    logp = torch.log_softmax(peaked[masks.code], -1)
    assert kept == adaptive_k(float(-(logp.exp() * logp).sum()), rules)  # low entropy: few codes
    flat = constrain_row(torch.zeros(rules.vocab_size), SpanState(mode="codes", h=4, w=4), rules, masks)
    assert torch.isfinite(flat).sum().item() == 16384  # ties at the k-th value all survive


def test_code_rows_in_one_pass_equal_one_row_at_a_time(rules, tiny_policy):
    """The vLLM processor constrains every code row of a step at once; the HF engine one row
    at a time. Rows of very different entropies (so different k) must come out the same, both
    equal to the rule written out here by hand (guided code logits x image scale, the k of the
    scalar formula, every code at or above the k-th largest kept, all else -inf), and the
    candidates `draw` gets are exactly each row's kept codes."""
    masks = Masks(rules, "cpu")
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(4, rules.vocab_size, generator=g) * torch.tensor([[0.1], [1.0], [4.0], [12.0]])
    guided = torch.randn(4, rules.vocab_size, generator=g)
    block = raw.clone()
    top, ids = constrain_codes(block, rules, masks, guided)
    kept = []
    for r in range(4):
        one = constrain_row(raw[r].clone(), SpanState(mode="codes", h=4, w=4), rules, masks, guided[r])
        assert torch.equal(one, block[r])
        codes = guided[r][masks.code] * rules.image_logit_scale
        logp = torch.log_softmax(codes.double(), -1)
        k = adaptive_k(float(-(logp.exp() * logp).sum()), rules)
        want = torch.full((rules.vocab_size,), float("-inf"))
        want[masks.code] = torch.where(codes >= torch.sort(codes, descending=True).values[k - 1], codes,
                                       torch.tensor(float("-inf")))
        assert torch.equal(one, want)
        kept.append(int(torch.isfinite(one).sum()))
        finite = torch.isfinite(top[r])
        assert set(ids[r][finite].tolist()) == set(torch.nonzero(torch.isfinite(one)).squeeze(-1).tolist())
        assert torch.equal(top[r][finite], one[ids[r][finite]])
    assert len(set(kept)) > 1  # the rows really had different k


def test_draw_greedy_nucleus_and_frequencies():
    ids = torch.tensor([[7, 3, 9, 1]])
    values = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    gen = torch.Generator().manual_seed(0)
    assert draw(values, ids, [0.0], [1.0], [gen]) == [7]
    assert {draw(values, ids, [1.0], [0.5], [gen])[0] for _ in range(50)} == {7}  # p(7) = 0.67 >= 0.5 alone
    counts = {t: 0 for t in (7, 3, 9, 1)}
    for _ in range(3000):
        counts[draw(values, ids, [1.0], [1.0], [gen])[0]] += 1
    expected = torch.softmax(values[0, :3], -1).tolist()
    assert counts[1] == 0  # never a forbidden token
    for t, p in zip((7, 3, 9), expected):
        assert abs(counts[t] / 3000 - p) < 0.03, (counts, expected)
    row = torch.full((20,), float("-inf"))
    row[[4, 11]] = torch.tensor([0.0, 0.0])
    assert {sample_row(row, 1.0, 1.0, gen) for _ in range(40)} == {4, 11}


def test_open_span_is_the_unconditional_context(rules, tiny_policy):
    lay = tiny_policy.layout
    lr = [lay.image_start, 643, 643] + [lay.image_code_ids[0]] * 4 + [lay.image_end]
    tail = [lay.image_start, rules.grid_base + 1]
    state = initial_state([1] + lr + [50] + tail, rules)
    assert state.span_len == 2 and open_span([1] + lr + [50] + tail, state) == tail
    assert open_span([1] + lr + [50], initial_state([1] + lr + [50], rules)) == []  # in text: none


def test_forced_tokens_and_initial_state(rules, tiny_policy):
    lay = tiny_policy.layout
    masks = Masks(rules, "cpu")
    st = initial_state([1, lay.image_start, 643, 643] + [lay.image_code_ids[0]] * 16 + [lay.row_newline] * 0
                       + [lay.image_end, 50, lay.image_start], rules)
    # the prompt's first span is the LR image; the tail opens the response's first (rough) image
    assert st.mode == "grid_h" and st.images == 0
    row = constrain_row(torch.randn(rules.vocab_size), st, rules, masks)
    assert int(torch.argmax(row)) == lay.grid_base + 1 and torch.isfinite(row).sum() == 1


def test_config_accepts_cfg_on_both_engines_and_refuses_a_negative_scale():
    for engine in ("vllm", "hf"):
        cfg = RolloutConfig(engine=engine)
        cfg.sampling.cfg_scale = 0.8
        assert problems(cfg) == []
        cfg.sampling.cfg_scale = -0.1
        assert [k for k, _ in problems(cfg)] == ["rollout.sampling.cfg_scale"]


def test_vllm_processor_refuses_async_scheduling_placeholders(rules, tiny_policy):
    """vLLM's async scheduling can show -1 placeholders among a request's output tokens; the
    span state machine would read one as a token, so the processor stops with the cause."""
    from rollout.vllm_processor import RuledRow, VLCoTLogitsProcessor

    proc = VLCoTLogitsProcessor(None, torch.device("cpu"), False)
    layout = tiny_policy.layout
    outputs = [layout.image_start, rules.grid_base + 1]
    proc.rows[0] = RuledRow(rules, Masks(rules, "cpu"), SpanState(), outputs)
    logits = torch.zeros(1, rules.vocab_size)
    proc.apply(logits)  # real tokens: the state advances to the width grid token, which is forced
    assert torch.isfinite(logits[0]).sum() == 1 and torch.isfinite(logits[0, rules.grid_base + 1])
    outputs.append(-1)
    with pytest.raises(RuntimeError, match="placeholder .* async scheduling"):
        proc.apply(torch.zeros(1, rules.vocab_size))
