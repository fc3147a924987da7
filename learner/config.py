"""Typed defaults for the learner (GRPO and cold-start SFT on DeepSpeed ZeRO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from learner.advantages import ADVANTAGE_ESTIMATORS, NORMALISE_MODES
from learner.grpo import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from learner.schedule import ScheduleConfig
from learner.shared_prompt import SHARED_PROMPT_MODES, shared_prompt_mode


@dataclass
class GRPOConfig:
    """Released RealSR-R1: lr 2e-6, no KL, no clipping, (r - mean)/(std + eps).

    `advantage`, `policy_loss`, `loss_agg` and `kl_estimator` name registered entries
    (learner/advantages.py, learner/grpo.py); config validation lists them."""

    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = "clip-higher"
    loss_agg: str = "seq-mean-token-mean"  # the released code's aggregation
    norm_tokens: int = 0  # seq-mean-token-sum-norm constant; 0 = padded length
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp_baseline
    # total: the estimator on the weighted reward total (published); per_reward: on each reward
    # alone, the results weighted and summed (learner/advantages.py, per_reward_advantages)
    normalise: str = "total"
    adv_eps: float = 1e-6
    policy_loss: str = "clipped"  # clipped (PPO-style, clip_low/clip_high) | unclipped
    kl_coef: float = 0.0  # 0 = no KL term in the loss (and no reference model unless kl_monitor)
    # Keep the frozen reference policy even at kl_coef 0, only to report `kl` (how far GRPO has
    # moved the policy). Costs one more copy of the weights and one more forward per micro-batch;
    # without it `kl` is not reported at all rather than logged as a meaningless 0.
    kl_monitor: bool = False
    kl_estimator: str = "k3"
    tis_cap: float = 2.0  # truncated IS weight cap for rollout-vs-learner log-prob mismatch; 0 = off
    # Image tokens outnumber text ~25:1 in a full trace (4,164 + 1,060 + 276 image tokens vs
    # ~200 text tokens), so under token-mean the text decisions (degradation words, captions)
    # get ~4% of the gradient. Defaults keep the published weighting (1, 1); raise
    # text_token_weight to rebalance.
    text_token_weight: float = 1.0
    image_token_weight: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer steps per epoch over the rollout batch
    recompute_old_logp: str = "auto"  # auto: when ppo_epochs > 1 or minibatches > 1 | always | never


@dataclass
class SFTConfig:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 4  # samples per optimizer step (all ranks together)
    log_every: int = 10


@dataclass
class LearnerConfig:
    num_workers: int = 2  # data-parallel ranks (Ray actors), each like a torchrun rank
    num_gpus: float = 0.0  # per rank; 0 = CPU with gloo
    num_cpus: float = 1.0
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank (pin to nodes)
    zero_stage: int = 2  # 2 or 3
    lr: float = 2e-6
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # adamw (released) | sgd (plain, no momentum: the update is the gradient itself, so a wrongly
    # scaled loss or gradient shows, where Adam's normalisation hides it)
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    micro_batch_size: int = 2  # samples per forward/backward on one rank
    gradient_checkpointing: bool = False
    # GRPO: the G responses of a prompt in one pass after one copy of the prompt (learner/shared_prompt.py).
    # auto = on where the policy's attention is SDPA or eager (the pack attention reproduces them);
    # on = refuse any other at start-up; off. Under it a micro-batch is one pack (a prompt and its
    # responses; micro_batch_size applies to SFT and to shared_prompt off), and the learner group
    # keeps a prompt's samples on one rank.
    shared_prompt: str = "auto"
    pack_max_tokens: int = 0  # most tokens in one pack (prompt + responses); 0 = a whole group per pack
    logprob_chunk: int = 1024  # positions per lm_head chunk in the memory-safe log-probs
    log_entropy: bool = True
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # DeepSpeed data_types.grad_accum_dtype: the dtype gradients are summed over micro-batches and
    # reduced in. auto = fp32 (bf16 sums over ten micro-batches lose precision: ~+9 GB per 7B rank
    # under ZeRO-3 over 3); bf16 only when training in bf16.
    grad_accum_dtype: str = "auto"  # auto | fp32 | bf16
    # zero_optimization.overlap_comm: gradient reduction and ZeRO-3 gathers on their own CUDA
    # streams, overlapped with compute. auto = on with GPUs, off on CPU (gloo)
    overlap_comm: str = "auto"  # auto | true | false
    seed: int = 0
    ds_shm_comm: bool = False  # CPU only: DeepSpeed's shared-memory collective op (JIT-compiles 40-100 s)
    bucket_mb: int = 256  # weight-broadcast bucket size
    save_shard_mb: int = 2048  # safetensors shard size of saved policies (rank 0 holds one shard while saving)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # of `lr` over the GRPO steps
    sft: SFTConfig = field(default_factory=SFTConfig)


def problems(cfg: LearnerConfig, prefix: str = "learner") -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    g = cfg.grpo
    if cfg.zero_stage not in (2, 3):
        out.append((f"{prefix}.zero_stage", f"must be 2 or 3, got {cfg.zero_stage}"))
    for key, registry in (("advantage", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                          ("loss_agg", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)):
        if getattr(g, key) not in registry:
            out.append((f"{prefix}.grpo.{key}", f"{getattr(g, key)!r} not in {registry.names()}"))
    if g.normalise not in NORMALISE_MODES:
        out.append((f"{prefix}.grpo.normalise", f"{g.normalise!r} not in {list(NORMALISE_MODES)}"))
    if shared_prompt_mode(cfg.shared_prompt) not in SHARED_PROMPT_MODES:
        out.append((f"{prefix}.shared_prompt", f"{cfg.shared_prompt!r} not in {list(SHARED_PROMPT_MODES)}"))
    if cfg.pack_max_tokens < 0:
        out.append((f"{prefix}.pack_max_tokens", "must be >= 0 (0 = a whole group per pack)"))
    if g.recompute_old_logp not in ("auto", "always", "never"):
        out.append((f"{prefix}.grpo.recompute_old_logp", f"{g.recompute_old_logp!r} not in ['auto', 'always', 'never']"))
    if cfg.optimizer not in ("adamw", "sgd"):
        out.append((f"{prefix}.optimizer", f"{cfg.optimizer!r} not in ['adamw', 'sgd']"))
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        out.append((f"{prefix}.dtype", f"{cfg.dtype!r} not in ['auto', 'float32', 'bfloat16']"))
    if cfg.grad_accum_dtype not in ("auto", "fp32", "bf16"):
        out.append((f"{prefix}.grad_accum_dtype", f"{cfg.grad_accum_dtype!r} not in ['auto', 'fp32', 'bf16']"))
    elif cfg.grad_accum_dtype == "bf16" and not (cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cfg.num_gpus > 0)):
        out.append((f"{prefix}.grad_accum_dtype", "bf16 needs bf16 training (dtype bfloat16, or auto with GPUs): "
                                                  "DeepSpeed refuses bf16 accumulation of fp32 gradients"))
    if str(cfg.overlap_comm).lower() not in ("auto", "true", "false"):  # yaml true arrives as "True"
        out.append((f"{prefix}.overlap_comm", f"{cfg.overlap_comm!r} not in ['auto', 'true', 'false']"))
    for key in ("clip_low", "clip_high", "kl_coef", "tis_cap", "text_token_weight", "image_token_weight"):
        if getattr(g, key) < 0:
            out.append((f"{prefix}.grpo.{key}", "must be >= 0"))
    for key in ("num_workers", "micro_batch_size", "logprob_chunk", "bucket_mb", "save_shard_mb"):
        if getattr(cfg, key) < 1:
            out.append((f"{prefix}.{key}", "must be >= 1"))
    if g.ppo_epochs < 1 or g.minibatches < 1:
        out.append((f"{prefix}.grpo", "ppo_epochs and minibatches must be >= 1"))
    if cfg.lr <= 0 or cfg.sft.lr <= 0:
        out.append((prefix, "lr and sft.lr must be > 0"))
    if cfg.num_workers >= 1 and cfg.sft.batch_size % cfg.num_workers:  # else num_workers is named above
        out.append((f"{prefix}.sft.batch_size", f"must be a multiple of num_workers {cfg.num_workers}"))
    if len(cfg.betas) != 2:
        out.append((f"{prefix}.betas", "must be [beta1, beta2]"))
    return out
