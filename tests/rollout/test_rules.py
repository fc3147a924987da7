import math

import numpy as np
import pytest
import torch

from rollout.config import RolloutConfig, SamplingConfig, problems
from rollout.rules import Masks, SpanRules, SpanState, adaptive_k, constrain_row, initial_state


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


def test_random_logits_always_give_valid_spans_in_stage_order(rules, tiny_policy):
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
    for span, side in zip(spans, (4, 8, 16)):
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


def test_forced_tokens_and_initial_state(rules, tiny_policy):
    lay = tiny_policy.layout
    masks = Masks(rules, "cpu")
    st = initial_state([1, lay.image_start, 643, 643] + [lay.image_code_ids[0]] * 16 + [lay.row_newline] * 0
                       + [lay.image_end, 50, lay.image_start], rules)
    # the prompt's first span is the LR image; the tail opens the response's first (rough) image
    assert st.mode == "grid_h" and st.images == 0
    row = constrain_row(torch.randn(rules.vocab_size), st, rules, masks)
    assert int(torch.argmax(row)) == lay.grid_base + 1 and torch.isfinite(row).sum() == 1


def test_config_rejects_cfg_with_vllm():
    cfg = RolloutConfig(engine="vllm")
    cfg.sampling.cfg_scale = 0.8
    assert any("cfg_scale" in k for k, _ in problems(cfg))
    cfg.engine = "hf"
    assert problems(cfg) == []


def test_vllm_processor_refuses_async_scheduling_placeholders(rules, tiny_policy):
    """vLLM's async scheduling can show -1 placeholders among a request's output tokens; the
    span state machine would read one as a token, so the processor stops with the cause."""
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLCoTLogitsProcessor

    proc = VLCoTLogitsProcessor(None, torch.device("cpu"), False)
    layout = tiny_policy.layout
    outputs = [layout.image_start, rules.grid_base + 1]
    proc.active[0] = (rules, Masks(rules, "cpu"), SpanState(), outputs)
    logits = torch.zeros(1, rules.vocab_size)
    proc.apply(logits)  # real tokens: the state advances to the width grid token, which is forced
    assert torch.isfinite(logits[0]).sum() == 1 and torch.isfinite(logits[0, rules.grid_base + 1])
    outputs.append(-1)
    with pytest.raises(RuntimeError, match="placeholder .* async scheduling"):
        proc.apply(torch.zeros(1, rules.vocab_size))
