"""ZeRO-3 prefetch on the learner's own passes, and the DeepSpeed config it trains under.

DeepSpeed prefetches ZeRO-3 parameters only along a completed trace of module calls, which it
resets only from the root module's forward — a forward the learner never calls. Here one real
CPU rank (DeepSpeed ZeRO-3 over gloo, WORLD_SIZE=1, in this process) shows: the trace is
COMPLETE after the first step and stays complete when the sequence length changes (lm_head is
one call per pass, not one per chunk), every parameter is released after a step, and the
log-probs, entropies and gradients equal those of the direct `model.model` + per-chunk lm_head
path of before, on the same weights and batch (fp32). A two-rank test with ranks of different
lengths checks the cross-rank trace comparison DeepSpeed makes while recording.
"""

import os

import numpy as np
import pytest
import torch

from learner.batch import pack
from learner.config import LearnerConfig, problems

CHUNK = 8  # positions per lm_head chunk: several chunks per micro-batch, a different number per length


def sft_batch(vocab: int, seed: int, response_lengths):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, vocab, 10)) for _ in response_lengths]
    responses = [list(rng.integers(3, vocab, n)) for n in response_lengths]
    return pack(prompts, responses)


@pytest.fixture(scope="module")
def zero3(policy_dir):
    from comm.transport import free_port

    saved = dict(os.environ)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    from learner.engine import LearnerEngine

    cfg = LearnerConfig(num_workers=1, zero_stage=3, lr=1e-3, micro_batch_size=2, logprob_chunk=CHUNK,
                        gradient_checkpointing=True)
    try:
        yield LearnerEngine(cfg, policy_dir)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def coordinator(eng):
    return eng.engine.optimizer.parameter_offload.get_param_coordinator()


def trace_modules(eng):
    return list(coordinator(eng)._PartitionedParameterCoordinator__submodule_order)


def all_released(eng) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in eng.engine.module.parameters())


def test_the_trace_completes_after_the_first_step_and_survives_another_length(zero3, monkeypatch):
    eng, vocab = zero3, zero3.engine.module.config.vocab_size
    coord = coordinator(eng)
    assert eng.zero3_trace() == "RECORD" and not coord.is_complete_trace()  # fresh engine: the first pass records
    invalidations = []
    real = coord._invalidate_trace
    monkeypatch.setattr(coord, "_invalidate_trace", lambda: (invalidations.append(1), real())[1])

    first = eng.sft_step(sft_batch(vocab, 0, [9, 5]))  # one micro-batch of 18 targets: 3 chunks
    assert np.isfinite(first["loss/sft"])
    assert eng.zero3_trace() == "COMPLETE" and coord.is_complete_trace()
    order = trace_modules(eng)
    lm_head = eng.engine.module.lm_head
    # forward and backward of the head: one call each, whatever the number of chunks
    assert sum(m is lm_head for m in order) == 2, [type(m).__name__ for m in order]
    assert all_released(eng)

    eng.sft_step(sft_batch(vocab, 1, [40, 23, 31, 7]))  # two micro-batches of 7 and 6 chunks
    assert invalidations == [] and eng.zero3_trace() == "COMPLETE"
    assert trace_modules(eng) == order and all_released(eng)


def test_logprobs_and_gradients_equal_the_direct_model_path(zero3, policy_dir):
    from deepspeed.utils import safe_get_full_grad

    from learner.logprobs import selected_logprobs
    from vlcot.policy import load_policy

    eng = zero3
    plain = load_policy(policy_dir, dtype=torch.float32).model
    missing, unexpected = plain.load_state_dict({k: torch.as_tensor(v) for k, v in eng.full_state_dict().items()},
                                                strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), missing
    plain.train()
    batch = sft_batch(plain.config.vocab_size, 2, [17, 30])
    mb, start = eng._trim(batch, np.arange(2))
    mask = torch.as_tensor(mb["loss_mask"][:, start:])

    # the learner's path: the DeepSpeed engine's module, one lm_head call for all chunks
    eng.engine.set_gradient_accumulation_boundary(True)
    logp, ent = eng._logp(eng.engine.module, mb, start, True)
    eng.engine.backward(-(logp * mask).sum(), scale_wrt_gas=False)
    eng._end_pass(eng.trace)
    grads = {n: safe_get_full_grad(p).clone() for n, p in eng.engine.module.named_parameters() if p.requires_grad}

    # before the change: model.model, then lm_head called chunk by chunk
    ids, am = torch.as_tensor(mb["input_ids"]), torch.as_tensor(mb["attention_mask"])
    hidden = plain.model(input_ids=ids, attention_mask=am, use_cache=False)[0][:, start:-1]
    ref_logp, ref_ent = selected_logprobs(hidden, plain.lm_head, ids[:, start + 1:], CHUNK, 1.0, True)
    (-(ref_logp * mask).sum()).backward()

    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-6)
    ref_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        ref = ref_grads[name]  # fp32: summation order differs inside the layers, ~1e-7 of the largest entry
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-6 * float(ref.abs().max()) + 1e-7, msg=name)
    assert all_released(eng)


def test_a_zero3_reference_policy_gets_its_own_complete_trace(zero3, policy_dir):
    from learner.batch import pack_grpo

    eng = zero3
    eng.cfg.grpo.kl_monitor = True  # a frozen ZeRO-3 reference: forward-only passes on its own engine
    try:
        assert eng.set_reference(policy_dir) and eng.ref_trace is not None and eng.ref_trace.state == "RECORD"
        b = sft_batch(eng.engine.module.config.vocab_size, 3, [12, 21])
        batch = pack_grpo([list(r[:10]) for r in b["input_ids"]], [list(r[10:m.sum()]) for r, m in
                                                                  zip(b["input_ids"], b["attention_mask"])], [1.0, -1.0])
        out = eng.grpo_step(batch)
        assert np.isfinite(out["kl"]) and eng.ref_trace.state == "COMPLETE" and eng.zero3_trace() == "COMPLETE"
    finally:
        eng.cfg.grpo.kl_monitor = False
        eng.ref, eng.ref_trace = None, None


def test_the_deepspeed_config_accumulates_in_fp32_and_overlaps_only_on_gpu(zero3):
    from learner.deepspeed_config import deepspeed_config

    conf = deepspeed_config(zero3.cfg, zero3.world, zero3.dtype, zero3.on_gpu, with_optimizer=True)  # this CPU rank (fp32)
    assert conf["data_types"] == {"grad_accum_dtype": "fp32"} and conf["zero_optimization"]["overlap_comm"] is False
    assert zero3.engine.get_data_types() == (torch.float32, torch.float32)

    def gpu_conf(**kw):  # what a bf16 GPU rank of 3 would build
        return deepspeed_config(LearnerConfig(num_gpus=1, zero_stage=3, **kw), 3, torch.bfloat16, True,
                                with_optimizer=True)

    c = gpu_conf()
    assert c["bf16"] == {"enabled": True} and c["data_types"] == {"grad_accum_dtype": "fp32"}
    assert c["zero_optimization"]["overlap_comm"] is True
    c = gpu_conf(grad_accum_dtype="bf16", overlap_comm="False")
    assert c["data_types"] == {"grad_accum_dtype": "bf16"} and c["zero_optimization"]["overlap_comm"] is False


def test_grad_accum_dtype_and_overlap_comm_are_validated():
    keys = lambda cfg: [k for k, _ in problems(cfg)]  # noqa: E731
    assert keys(LearnerConfig()) == [] and keys(LearnerConfig(grad_accum_dtype="fp32", overlap_comm="True")) == []
    assert keys(LearnerConfig(grad_accum_dtype="fp16")) == ["learner.grad_accum_dtype"]
    assert keys(LearnerConfig(grad_accum_dtype="bf16")) == ["learner.grad_accum_dtype"]  # fp32 training on CPU
    assert keys(LearnerConfig(grad_accum_dtype="bf16", num_gpus=1)) == []
    assert keys(LearnerConfig(grad_accum_dtype="bf16", dtype="bfloat16")) == []
    assert keys(LearnerConfig(overlap_comm="sometimes")) == ["learner.overlap_comm"]


@pytest.mark.slow
def test_two_zero3_ranks_with_different_lengths_complete_the_same_trace(ray_local, policy_dir, tiny_policy):
    from cluster.learner_group import LearnerGroup

    vocab = tiny_policy.model.config.vocab_size
    group = LearnerGroup(LearnerConfig(num_workers=2, zero_stage=3, lr=1e-3, micro_batch_size=2,
                                       logprob_chunk=CHUNK), policy_dir)
    try:
        # rank 0 gets the short samples, rank 1 the long ones: different chunk counts per rank
        for step, lengths in enumerate(([5, 40, 6, 33], [9, 26, 4, 51])):
            out = group.sft_step(sft_batch(vocab, 10 + step, lengths))
            assert np.isfinite(out["loss/sft"])
        assert group._on_all("zero3_trace") == ["COMPLETE", "COMPLETE"]
        d = group.param_digests()
        assert d[0] == d[1]
    finally:
        group.shutdown()
