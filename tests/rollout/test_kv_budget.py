"""The KV budget arithmetic and the admission ledger (rollout/kv_budget.py), on numbers worked
out by hand from the paper's sizes and Chameleon-7B's shape."""

import pytest

from rollout.kv_budget import (CHAMELEON_7B, AdmissionLedger, KVCapacity, decoder_shape, estimate_worker_kv,
                               gpu_kv_capacity_tokens, per_sample_blocks, shape_from_hf_config, span_tokens,
                               trace_tokens)


def test_image_spans_at_the_paper_sizes():
    # c codes a side (8 px each): image_start, 2 grid tokens, c rows of c codes + newline, image_end
    assert [span_tokens(s) for s in (128, 256, 512)] == [16 * 17 + 4, 32 * 33 + 4, 64 * 65 + 4] == [276, 1060, 4164]


def test_chameleon_7b_kv_bytes_weights_and_gpu_capacity():
    shape = decoder_shape(**CHAMELEON_7B, dtype_bytes=2, source="documented")
    assert shape.bytes_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    # 32 x (q, o 4096^2 + k, v 4096 x 4096 + MLP 3 x 4096 x 11008) + embedding and lm_head 2 x 73728 x 4096
    assert shape.params == 32 * (2 * 4096 ** 2 + 2 * 4096 ** 2 + 3 * 4096 * 11008) + 2 * 73728 * 4096 == 7_079_985_152
    # 0.85 x 80 GiB - 14.16 GB of bf16 weights - 4 GiB reserve, in 512 KiB tokens
    expect = (0.85 * 80 * 2 ** 30 - 7_079_985_152 * 2 - 4 * 2 ** 30) // (512 * 1024)
    assert gpu_kv_capacity_tokens(shape, 0.85) == int(expect) == 104_064


def test_shape_from_a_config_json_reads_gqa_and_falls_back_when_sizes_are_missing():
    raw = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3,
           "intermediate_size": 176, "vocab_size": 1000}
    s = shape_from_hf_config(raw, 4, "config.json")
    assert s.bytes_per_token == 2 * 3 * 1 * 32 * 4 and s.kv_heads == 1 and s.head_dim == 32
    assert s.params == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176) + 2 * 1000 * 64
    assert shape_from_hf_config({"architectures": ["ChameleonForConditionalGeneration"]}, 2, "x") is None


def test_published_worker_demand_counts_the_twins():
    """6 prompts x G 5 over 4 workers (configs/pure-7b-published.yaml), 160 instruction tokens."""
    t = trace_tokens(hr_size=512, prompt_size=512, instruction_tokens=160, text_budget=512, cfg_scale=0.8)
    assert (t.prompt, t.response, t.twin) == (4164 + 160, 276 + 1060 + 4164 + 512, 4164)
    est = estimate_worker_kv(t, group_size=5, prompts_per_step=6, num_workers=4, capacity_tokens=104_064)
    assert est.prompts == 2
    assert est.demand == 2 * (4324 + 5 * (6012 + 4164)) == 110_408 and not est.fits
    assert est.samples_at_once == 104_064 // (4324 + 6012 + 4164) == 7
    # without guidance no twin: pure-7b's 8 prompts over 3 workers
    plain = trace_tokens(512, 512, 160, 512)
    est = estimate_worker_kv(plain, 5, 8, 3, 104_064)
    assert plain.twin == 0 and est.demand == 3 * (4324 + 5 * 6012) == 103_152 and est.fits
    # max_new_tokens replaces the spans + text budget
    assert trace_tokens(512, 512, 160, 512, max_new_tokens=7000).response == 7000


def test_blocks_round_up_per_request_and_per_kv_group():
    cap = KVCapacity(blocks=100, block_size=16, groups=1, step_tokens=2048, max_seqs=64)
    assert [cap.blocks_for(n) for n in (1, 16, 17, 32)] == [1, 1, 2, 2]
    assert KVCapacity(100, 16, 2, 2048, 64).blocks_for(17) == 4
    # a sample: ceil((prompt + max new) / 16) + ceil(twin / 16)
    assert per_sample_blocks(cap, [100, 17], max_new=20, twin=33) == [8 + 3, 3 + 3]
    assert per_sample_blocks(cap, [100], max_new=20, twin=0) == [8]


def ledger(blocks=10, need=(4, 4, 4), prompt=(10, 10, 10), step=1000, seqs=64, enabled=True):
    uids = [f"s{k}" for k in range(len(need))]
    return AdmissionLedger(KVCapacity(blocks, 16, 1, step, seqs), uids, dict(zip(uids, need)),
                           dict(zip(uids, prompt)), enabled=enabled)


def test_admits_what_fits_and_the_next_when_a_sample_and_its_twin_are_done():
    led = ledger()
    assert led.admit() == ["s0", "s1"] and led.reserved == 8  # 12 blocks would not fit in 10
    led.output("s0"), led.output("s1")
    assert led.admit() == []
    led.twin_started("s0", "t0")
    led.sample_finished("s0")
    assert led.admit() == [] and led.reserved == 8  # its twin still holds blocks
    led.twin_finished("t0")
    assert led.reserved == 4 and led.admit() == ["s2"]
    assert led.summary()["peak_samples"] == 2 and led.summary()["held_back"] == 1


def test_nothing_is_admitted_while_a_sample_prefills_or_beyond_a_steps_token_budget():
    led = ledger(blocks=100, prompt=(60, 60, 60), step=130)
    assert led.admit() == ["s0", "s1"]  # 60 + 60 <= 130; a third prefill would be chunked
    assert led.admit() == []  # both still prefilling: a chunk could take a twin's step
    led.output("s0"), led.output("s1")
    # two running samples and their twins take 4 tokens, a twin joining now 70 more: 56 left
    assert led.admit(twin_tokens=70) == [] and led.admit(twin_tokens=66) == ["s2"]


def test_a_prompt_longer_than_a_step_runs_alone_and_the_request_cap_holds():
    led = ledger(blocks=100, prompt=(500, 10, 10), step=100)
    assert led.admit() == ["s0"]
    led.output("s0")
    assert led.admit() == ["s1", "s2"]
    led = ledger(blocks=100, seqs=4)  # each sample may bring a twin: 2 samples fill 4 requests
    assert led.admit() == ["s0", "s1"]


def test_a_sample_too_large_for_the_cache_is_named_and_without_control_all_run_at_once():
    assert ledger(need=(4, 11, 10)).too_large() == ["s1"]
    led = ledger(need=(4, 11, 10), enabled=False)
    assert led.admit() == ["s0", "s1", "s2"] and led.peak_samples == 3


@pytest.mark.parametrize("blocks", [0, -1])
def test_kv_cache_blocks_is_validated(blocks):
    from rollout.config import RolloutConfig, problems

    keys = [k for k, _ in problems(RolloutConfig(kv_cache_blocks=blocks))]
    assert ("rollout.kv_cache_blocks" in keys) == (blocks < 0)
