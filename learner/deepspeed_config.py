"""The DeepSpeed config of a learner rank: ZeRO stage, precision, gradient accumulation dtype,
communication overlap and optimizer, from `LearnerConfig`."""

from __future__ import annotations

from typing import Any, Dict

import torch

from learner.config import LearnerConfig


def deepspeed_config(c: LearnerConfig, world: int, dtype: torch.dtype, on_gpu: bool, with_optimizer: bool) -> Dict[str, Any]:
    """The DeepSpeed config of a learner rank (`with_optimizer` False: the frozen ZeRO-3 reference)."""
    # overlap: gradient reduction and ZeRO-3 gathers on their own CUDA streams (auto: GPU only)
    want = str(c.overlap_comm).lower()  # a yaml true arrives as "True"
    overlap = want == "true" or (want == "auto" and on_gpu)
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": c.micro_batch_size,
        "gradient_accumulation_steps": 1,  # accumulation is driven by set_gradient_accumulation_boundary
        "train_batch_size": c.micro_batch_size * world,
        "gradient_clipping": c.grad_clip,
        "zero_optimization": {"stage": c.zero_stage, "overlap_comm": overlap, "contiguous_gradients": True},
        "bf16": {"enabled": dtype == torch.bfloat16},
        # gradients summed over micro-batches (and reduced) in fp32 unless bf16 is asked for
        "data_types": {"grad_accum_dtype": "bf16" if c.grad_accum_dtype == "bf16" else "fp32"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if c.zero_stage == 3:
        conf["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                          "stage3_param_persistence_threshold": 0})
    if with_optimizer and c.optimizer == "sgd":  # DeepSpeed builds torch.optim.SGD by name
        conf["optimizer"] = {"type": "SGD", "params": {"lr": c.lr, "weight_decay": c.weight_decay}}
        conf["zero_allow_untested_optimizer"] = True  # plain SGD keeps no state for ZeRO to shard
    elif with_optimizer:
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": c.lr, "betas": list(c.betas), "eps": 1e-8,
                                                         "weight_decay": c.weight_decay, "torch_adam": True}}
    return conf
