"""A checkpoint in the released PURE / Lumina-mGPT layout, after `import-policy`, through both
engines in Ray rollout workers and the DeepSpeed learner: log-probs against a hand-built
reference, SFT in the released conversation format, generation that stops at 8710 and parses,
a GRPO step, and bucketed weight broadcasts into vLLM whose receiver memory is measured."""

import functools

import numpy as np
import pytest
import ray
import torch

from comm.transport import WeightTransport, free_port
from learner.batch import pack_grpo
from learner.config import LearnerConfig, SFTConfig
from cluster.learner_group import LearnerGroup
from learner.sft import run_sft
from rollout.config import RolloutConfig
from rollout.worker import RolloutWorker
from tests.cluster.test_weight_sync import assert_every_tensor_synced
from tests.released_checkpoint import write_released_checkpoint
from tests.rewards.helpers import make_trace
from tests.vlcot.test_import_policy import _reference_model
from vlcot.importer import import_policy
from vlcot.policy import load_policy
from vlcot.trace import build_prompt, parse_response, serialise_response

pytestmark = pytest.mark.slow
END = 8710  # <reserved08706>: the released turn separator and end of generation
LOGPROB_TOL = 2e-4
BUCKET_MB = 1


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    # six layers: the 1 MB broadcast buckets then split the decoder layers over several buckets
    src = write_released_checkpoint(tmp_path_factory.mktemp("released") / "PURE-tiny", layers=6)
    out = tmp_path_factory.mktemp("imported") / "policy"
    import_policy(src, out)
    return src, out


@pytest.fixture(scope="module")
def policy(released):
    return load_policy(released[1])


@pytest.fixture(scope="module")
def workers(ray_local, released, tiny_cfg):
    def cfg(engine):
        c = RolloutConfig(engine=engine, group_size=2, max_model_len=1536)
        c.sampling.text_budget = 16
        return c

    ws = {e: RolloutWorker.options(num_cpus=1).remote(cfg(e), str(released[1]), tiny_cfg.image) for e in ("vllm", "hf")}
    ray.get([w.ready.remote() for w in ws.values()])
    return ws


@pytest.fixture(scope="module")
def prompts(policy):
    """The RL prompt in the lumina format, and the same prompt continued by a whole trace up to
    the final image's end token (the policy then has to close the tag and end the turn)."""
    codec, lay = policy.codec, policy.layout
    base = build_prompt(np.random.default_rng(0).integers(0, 16384, (16, 16)), codec, lay)
    full = serialise_response(make_trace(), codec, lay)
    cut = len(full) - 1 - full[::-1].index(lay.image_end)  # the last image_end
    return {"base": base, "trace_prefix": full[: cut + 1], "tail": full[cut + 1:]}


def test_both_engines_load_the_import_and_match_the_reference(workers, released, prompts):
    seq = prompts["base"] + prompts["trace_prefix"][:40]
    ids = torch.tensor([seq])
    with torch.no_grad():
        logp = torch.log_softmax(_reference_model(released[0])(input_ids=ids).logits[0, :-1].float(), -1)
    want = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
    for engine, w in workers.items():
        got = ray.get(w.prompt_logprobs.remote([seq]))[0]
        np.testing.assert_allclose(got, want, atol=LOGPROB_TOL, rtol=0, err_msg=engine)


def _join(group, worker):
    port = free_port()
    refs = group.join_weight_group(functools.partial(WeightTransport, "127.0.0.1", port, 0, 2))
    refs.append(worker.join_weight_group.remote(functools.partial(WeightTransport, "127.0.0.1", port, 1, 2)))
    ray.get(refs)


def _broadcast(group, worker, version):
    got = worker.receive_weights.remote()
    sent = ray.get(group.broadcast_async(version))[0]
    return sent, ray.get(got)


def test_sft_in_the_released_format_then_generation_stops_at_8710_and_a_grpo_step(workers, released, policy, prompts):
    lay, codec = policy.layout, policy.codec
    assert prompts["tail"][-1] == END and prompts["base"][-1] == END
    group = LearnerGroup(LearnerConfig(num_workers=1, zero_stage=2, lr=1e-3, num_cpus=1, bucket_mb=BUCKET_MB),
                         str(released[1]))
    vllm = workers["vllm"]
    try:
        prompt = prompts["base"] + prompts["trace_prefix"]
        hist = run_sft(group, [prompt], [prompts["tail"]], SFTConfig(steps=25, lr=2e-2, batch_size=1),
                       pad_id=1, image_ids=lay.image_span_ids())
        assert hist[-1]["loss/sft"] < 0.05 * hist[0]["loss/sft"]
        _join(group, vllm)
        sent, got = _broadcast(group, vllm, 1)
        n_params = len(list(policy.model.named_parameters()))
        assert got["version"] == 1 and got["tensors"] == n_params
        # the receiver held at most two buckets at once (measured through the buckets' storage
        # use counts while vLLM loaded them), far below the model's size
        assert sent["sync/buckets"] >= 4
        assert 1 <= got["peak_live_buckets"] <= 2, got  # measured (-1 would mean "unknown")
        biggest = 73728 * 64 * 4  # embed_tokens / lm_head in fp32 get a bucket each
        assert biggest <= got["peak_live_bytes"] <= 2 * biggest < sent["sync/bytes"]

        out = ray.get(vllm.generate.remote([prompt], 1, 0, True))[0][0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == END, out.token_ids
        parsed = parse_response(prompts["trace_prefix"] + out.token_ids, codec, lay, hr_size=128)
        assert parsed.finished and parsed.strict_format and parsed.valid, parsed.invalid_reasons()
        hf = workers["hf"]
        ray.get(hf.update_weights.remote(group.full_state_dict(), 1))
        assert ray.get(hf.generate.remote([prompt], 1, 0, True))[0][0].token_ids == out.token_ids

        # one GRPO step on sampled groups, then the new weights reach vLLM
        groups = ray.get(vllm.generate.remote([prompts["base"], prompt], 2, 3))
        samples = [s for g in groups for s in g]
        batch = pack_grpo([prompts["base"]] * 2 + [prompt] * 2, [s.token_ids for s in samples],
                          [1.0, -1.0, 0.5, -0.5], [s.logprobs for s in samples], pad_id=1,
                          image_token_ids=lay.image_span_ids())
        # the learner scores the sampled tokens as the engines did (same weights, temperature 1,
        # target j + 1 in column j): a shift by one or a temperature in either fails by far more
        mask = batch["loss_mask"] > 0
        np.testing.assert_allclose(group.logprobs(batch)[mask], batch["rollout_logp"][mask], atol=LOGPROB_TOL, rtol=0)
        hf_samples = [s for g in ray.get(hf.generate.remote([prompt], 2, 5)) for s in g]
        hf_batch = pack_grpo([prompt] * 2, [s.token_ids for s in hf_samples], [1.0, -1.0],
                             [s.logprobs for s in hf_samples], pad_id=1, image_token_ids=lay.image_span_ids())
        hf_mask = hf_batch["loss_mask"] > 0
        np.testing.assert_allclose(group.logprobs(hf_batch)[hf_mask], hf_batch["rollout_logp"][hf_mask],
                                   atol=LOGPROB_TOL, rtol=0)
        metrics = group.grpo_step(batch)
        assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # the first update is on-policy
        assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # learner / engine agree
        _broadcast(group, vllm, 2)
        assert_every_tensor_synced(vllm, group)
        assert ray.get(vllm.generate.remote([prompts["base"]], 1, 0, True))[0][0].version == 2
    finally:
        group.shutdown()
