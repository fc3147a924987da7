"""The skeleton decoding mode (rollout/skeleton.py): whatever the logits say, a response is the
seven tags in order around the policy's text, with all three images at their sizes, and ends.
Checked on random logits in the project's format (tags are single tokens) and in the released
lumina format (tags are several BPE tokens), against the trace parser, not against the rules."""

import numpy as np
import pytest
import torch

from rollout.config import SamplingConfig
from rollout.rules import Masks, SpanRules, SpanState, constrain_row, initial_state
from rollout.skeleton import build_skeleton
from vlcot.config import ImageConfig
from vlcot.trace import IMAGE_STAGES, STAGES, build_prompt, parse_response


@pytest.fixture(scope="module")
def released_policy(tmp_path_factory):
    """The released-layout fixture after import: the lumina conversation, tags of several tokens."""
    from tests.released_checkpoint import write_released_checkpoint
    from vlcot.importer import import_policy
    from vlcot.policy import load_policy

    src = write_released_checkpoint(tmp_path_factory.mktemp("released") / "PURE-tiny", layers=1)
    out = tmp_path_factory.mktemp("imported") / "policy"
    import_policy(src, out)
    return load_policy(out)


def _rules(policy, image_cfg, **sampling):
    s = SamplingConfig(skeleton=True, **sampling)
    return SpanRules.build(policy.layout, image_cfg, s, policy.model.config.vocab_size, len(policy.tokenizer),
                           policy.codec)


def _decode(rules, prompt, steps, seed, bias=None):
    """Sample a response from random logits (plus `bias`) under the rules: rows and Gumbel noise
    drawn from a bank of 32 (a draw over 73k entries per step would dominate the test)."""
    masks = Masks(rules, "cpu")
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(32, rules.vocab_size, generator=g) * 3 + (0 if bias is None else bias)
    gumbel = -torch.log(-torch.log(torch.rand(32, rules.vocab_size, generator=g).clamp_(1e-12, 1.0)))
    pick = torch.randint(0, 32, (steps, 2), generator=g).tolist()
    state, out = initial_state(prompt, rules), []
    end = rules.skeleton_runs[-1][-1]
    for i, j in pick:
        row = constrain_row(bank[i].clone(), state, rules, masks)
        tok = int(torch.argmax(row + gumbel[j]))  # a draw from softmax(row)
        out.append(tok)
        state.feed(tok, rules)
        if tok == end:
            break
    return out, state


@pytest.mark.parametrize("fmt", ["project", "lumina"])
def test_random_logits_give_the_whole_trace(fmt, tiny_cfg, tiny_policy, request):
    policy = tiny_policy if fmt == "project" else request.getfixturevalue("released_policy")
    image = tiny_cfg.image if fmt == "project" else ImageConfig(hr_size=128, lr_size=32, prompt_size=128, patch_px=32)
    rules = _rules(policy, image, text_budget=160, topk_max=64)
    prompt = build_prompt(np.random.default_rng(0).integers(0, 16384, (8, 8)), policy.codec, policy.layout)
    limit = sum(rules.span_tokens(i) for i in range(3)) + 160
    bias = torch.zeros(rules.vocab_size)
    bias[policy.codec.end_token_id] = 30.0  # a policy that wants to stop at once
    bias[policy.layout.image_start] = 30.0  # or to draw images anywhere
    for seed in range(2):
        out, state = _decode(rules, prompt, limit + 10, seed, bias if seed else None)
        assert out[-1] == policy.codec.end_token_id and len(out) <= limit
        parsed = parse_response(out, policy.codec, policy.layout, image.hr_size)
        assert parsed.strict_format and parsed.finished, (fmt, seed, parsed.skeleton[:300])
        for stage, scale in zip(IMAGE_STAGES, (4, 2, 1)):  # rough HR/4, middle HR/2, final HR; 8 px a code
            side = image.hr_size // scale // 8
            assert parsed.stages[stage].valid and parsed.stages[stage].codes.shape == (side, side)
        assert state.images == 3 and not state.off


def test_text_bodies_keep_their_budgets_and_the_policy_may_close_a_stage(tiny_cfg, tiny_policy):
    rules = _rules(tiny_policy, tiny_cfg.image, text_budget=120)
    runs, budgets = rules.skeleton_runs, rules.skeleton_budgets
    prompt = build_prompt(np.random.default_rng(1).integers(0, 16384, (8, 8)), tiny_policy.codec, tiny_policy.layout)
    # a policy that never closes a stage: every text body is cut at its budget
    never = torch.zeros(rules.vocab_size)
    for r in runs[1:]:
        never[r[0]] = -50.0
    out, _ = _decode(rules, prompt, 2000, 0, never)
    bodies = _text_bodies(out, runs, tiny_policy.layout)
    assert [len(b) for b in bodies] == [b for s, b in zip(STAGES, budgets) if s not in IMAGE_STAGES]
    # a policy that closes each stage at once: the runs follow and the bodies are empty
    bias = torch.zeros(rules.vocab_size)
    for r in runs[1:]:
        bias[r[0]] = 40.0
    out, _ = _decode(rules, prompt, 2000, 0, bias)
    assert [len(b) for b in _text_bodies(out, runs, tiny_policy.layout)] == [0, 0, 0, 0]
    assert parse_response(out, tiny_policy.codec, tiny_policy.layout, tiny_cfg.image.hr_size).strict_format


def _text_bodies(out, runs, layout):
    """The tokens between forced runs outside images, found by matching the runs in order."""
    bodies, i = [], 0
    for k, run in enumerate(runs):
        start = i
        while out[i:i + len(run)] != list(run):
            i += 1
        if k and STAGES[k - 1] not in IMAGE_STAGES:
            bodies.append(out[start:i])
        i += len(run)
        if run[-1] == layout.image_start:  # skip the image span
            i = out.index(layout.image_end, i) + 1
    return bodies


def test_a_budget_too_small_for_the_tags_names_the_setting(tiny_policy):
    with pytest.raises(ValueError, match="text_budget 10 .* set text_budget >= "):
        build_skeleton(tiny_policy.codec, tiny_policy.layout, 10)


def test_a_prompt_that_leaves_the_skeleton_falls_back_to_the_span_rules(tiny_cfg, tiny_policy, prompts):
    """A prompt continuing a partial trace in another order (ending as the final image opens)
    turns the skeleton off for that sequence; the span rules still draw the image."""
    rules = _rules(tiny_policy, tiny_cfg.image, text_budget=160)
    state = initial_state(prompts["final_image"], rules)
    assert state.mode == "grid_h"
    fresh = SpanState()
    fresh.feed(rules.skeleton_runs[0][0] + 1 if rules.skeleton_runs[0][0] + 1 != tiny_policy.layout.image_start
               else rules.skeleton_runs[0][0] + 2, rules)
    assert fresh.off and fresh.next_kind(rules) == ("text", None)
