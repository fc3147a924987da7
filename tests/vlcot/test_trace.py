import numpy as np
import pytest

from vlcot.trace import (
    STAGES, Trace, build_prompt, degradation_text, parse_degradation, parse_response,
    serialise_response, strict_format_ok,
)

HR = 128  # tiny config: rough 32 px (4x4 codes), middle 64 (8x8), final 128 (16x16)


def make_trace(seed=0):
    rng = np.random.default_rng(seed)
    return Trace(
        degradation=["medium", "downsample", "heavy", "light", "upsample"],
        rough_understand="A cat.",
        middle_understand="A ginger cat with green eyes.",
        final_understand="Close-up of a ginger tabby cat with long whiskers.",
        rough_image=rng.integers(0, 16384, (4, 4)),
        middle_image=rng.integers(0, 16384, (8, 8)),
        final_image=rng.integers(0, 16384, (16, 16)),
    )


def test_degradation_text_is_the_published_form():
    assert degradation_text(["medium", "downsample", "heavy", "light", "upsample"]) == \
        "medium blur, downsample, heavy noise, light compression, upsample"
    words, why = parse_degradation("No blur, keep, none noise, Heavy compression, downsample")
    assert why == "" and words == ["none", "keep", "none", "heavy", "downsample"]
    words, why = parse_degradation("medium blur, sideways, heavy noise")
    assert words == ["medium", None, "heavy", None, None]
    assert "3 items" in why and "resize" in why


def test_roundtrip_serialise_then_parse(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    trace = make_trace()
    ids = serialise_response(trace, codec, layout)
    parsed = parse_response(ids, codec, layout, hr_size=HR)
    assert parsed.valid and parsed.strict_format and parsed.finished, parsed.invalid_reasons()
    back = parsed.to_trace()
    assert back.degradation == trace.degradation
    for s in ("rough_understand", "middle_understand", "final_understand"):
        assert getattr(back, s) == getattr(trace, s)
    for s in ("rough_image", "middle_image", "final_image"):
        np.testing.assert_array_equal(getattr(back, s), getattr(trace, s))
    assert parsed.num_image_spans == 3
    assert parsed.num_image_tokens == (4 * 5 + 4) + (8 * 9 + 4) + (16 * 17 + 4)


def test_prompt_holds_the_lr_span(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    lr = np.arange(256).reshape(16, 16)
    ids = build_prompt(lr, codec, layout)
    assert ids[0] == codec.bos_token_id
    start = ids.index(layout.image_start)
    codes, why = layout.parse_image_span(ids[start:ids.index(layout.image_end) + 1])
    np.testing.assert_array_equal(codes, lr)
    assert "<degradation>" in codec.decode_text(ids[ids.index(layout.image_end) + 1:])
    # the tiny policy speaks the `realsr` format: the prompt ends with its role words, a
    # response with </s>
    assert codec.conversation.name == "realsr"
    assert codec.decode_text(ids[-12:]).endswith("resolution.\nAssistant: ")
    assert codec.end_token_id == tiny_policy.tokenizer.convert_tokens_to_ids("</s>")


def test_a_conversation_token_missing_from_the_vocabulary_is_named(tiny_policy):
    import dataclasses

    from vlcot.text_tokenizer import HFTextCodec

    bad = dataclasses.replace(tiny_policy.conversation, end_token="<reserved08706>")
    with pytest.raises(ValueError, match=r"end_token '<reserved08706>' is not a token .*policy.conversation.end_token"):
        HFTextCodec(tiny_policy.tokenizer, tiny_policy.layout, bad)


def test_wrong_resolution_and_order(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    trace = make_trace()
    trace.middle_image = trace.rough_image  # 4x4 where 8x8 is due
    parsed = parse_response(serialise_response(trace, codec, layout), codec, layout, hr_size=HR)
    assert parsed.strict_format  # the published check ignores image sizes
    assert not parsed.stages["middle_image"].valid
    assert "expected 8x8" in parsed.stages["middle_image"].reason

    # swap two stages: every stage still parses, but the strict (ordered) check fails
    text = "<rough_understand>a</rough_understand><degradation>medium blur, downsample, heavy noise, light compression, upsample</degradation>"
    skeleton_ids = codec.encode_text(text)
    parsed = parse_response(skeleton_ids, codec, layout)
    assert not parsed.strict_format
    assert parsed.stages["degradation"].valid and parsed.stages["rough_understand"].valid
    assert parsed.stages["degradation"].position > parsed.stages["rough_understand"].position


@pytest.mark.parametrize("skeleton,ok", [
    ("<degradation>x</degradation><rough_understand>a</rough_understand><rough_image><image:0></rough_image>"
     "<middle_understand>b</middle_understand><middle_image><image:1></middle_image>"
     "<final_understand>c</final_understand><final_image><image:2></final_image>", True),
    (" <degradation>x</degradation>\n<rough_understand>a</rough_understand> <rough_image> <image:0> </rough_image>"
     "<middle_understand>b</middle_understand><middle_image><image:1></middle_image>"
     "<final_understand>c</final_understand><final_image><image:2></final_image>\n", True),
    # text outside the tags
    ("Sure! <degradation>x</degradation><rough_understand>a</rough_understand><rough_image><image:0></rough_image>"
     "<middle_understand>b</middle_understand><middle_image><image:1></middle_image>"
     "<final_understand>c</final_understand><final_image><image:2></final_image>", False),
    # image missing in a stage
    ("<degradation>x</degradation><rough_understand>a</rough_understand><rough_image></rough_image>"
     "<middle_understand>b</middle_understand><middle_image><image:1></middle_image>"
     "<final_understand>c</final_understand><final_image><image:2></final_image>", False),
    # image inside a text stage
    ("<degradation>x</degradation><rough_understand>a<image:0></rough_understand><rough_image><image:0></rough_image>"
     "<middle_understand>b</middle_understand><middle_image><image:1></middle_image>"
     "<final_understand>c</final_understand><final_image><image:2></final_image>", False),
    ("<degradation>x</degradation>", False),
    ("", False),
])
def test_strict_format(skeleton, ok):
    assert strict_format_ok(skeleton) is ok


def test_every_truncation_is_invalid_and_never_raises(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    ids = serialise_response(make_trace(), codec, layout)
    for cut in range(0, len(ids) - 1):  # every strict prefix that drops at least the EOS
        parsed = parse_response(ids[:cut], codec, layout, hr_size=HR)
        assert not parsed.valid
        assert not parsed.finished
        assert parsed.invalid_reasons(), cut


def test_truncated_image_span_has_a_reason(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    ids = serialise_response(make_trace(), codec, layout)
    last_start = len(ids) - 1 - ids[::-1].index(layout.image_start)
    parsed = parse_response(ids[: last_start + 40], codec, layout, hr_size=HR)
    assert parsed.stages["rough_image"].valid and parsed.stages["middle_image"].valid
    assert not parsed.stages["final_image"].valid
    assert "not closed" in parsed.stages["final_image"].reason
    assert "truncated" in parsed.stages["final_image"].reason


def test_garbage_parses_to_invalid(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    vocab = tiny_policy.model.config.vocab_size
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(0, 400))
        ids = rng.integers(-5, vocab + 50, size=n).tolist()  # includes out-of-vocabulary ids
        if trial % 3 == 0:  # sprinkle real structure tokens to reach deeper code paths
            ids[::7] = [layout.image_start] * len(ids[::7])
        parsed = parse_response(ids, codec, layout, hr_size=HR)
        assert not parsed.valid
        assert set(parsed.stages) == set(STAGES)
        assert all(s.reason for s in parsed.stages.values() if not s.valid)
    assert not parse_response(["x", None], codec, layout).valid
    assert not parse_response([], codec, layout).valid


def test_stray_image_tokens_in_text_make_that_stage_invalid(tiny_policy):
    codec, layout = tiny_policy.codec, tiny_policy.layout
    ids = serialise_response(make_trace(), codec, layout)
    pos = ids.index(codec.encode_text("</rough_understand>")[0])
    ids = ids[:pos] + [layout.image_code_ids[7], layout.row_newline] + ids[pos:]
    parsed = parse_response(ids, codec, layout, hr_size=HR)
    assert not parsed.stages["rough_understand"].valid
    assert "image or special tokens" in parsed.stages["rough_understand"].reason
    assert parsed.stages["middle_understand"].valid
