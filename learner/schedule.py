"""Learning-rate schedules for the GRPO steps: constant, linear decay and cosine, each with a
linear warmup, over one or more phases.

The learning rate is a pure function of the step (and the configuration), so a resumed run,
whose checkpoint holds the step, continues the schedule exactly where it stopped; the
checkpoint also records the schedule, and a resume under a different one says so.

A phase is `{steps, lr}`: it starts at its own `lr` and decays over its own steps. No phases
means one phase of `trainer.steps` at `learner.lr`. The released RealSR-R1 run is two phases
(about 30 steps at 5e-6, then about 170 at 2e-6), each decaying linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

from vlcot.registry import Registry

# progress in [0, 1] through a phase -> multiplier of the phase's lr, from 1 down to `final`
DECAYS: Registry[Callable[[float, float], float]] = Registry("learning-rate schedule")
DECAYS.register("constant")(lambda progress, final: 1.0)
DECAYS.register("linear")(lambda progress, final: 1.0 - (1.0 - final) * progress)
DECAYS.register("cosine")(lambda progress, final: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class LRPhase:
    steps: int
    lr: float


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0  # the run's first N steps ramp up: step k (1..N) trains at k/(N+1) of the lr
    final_ratio: float = 0.0  # linear / cosine: a phase ends at final_ratio x its lr
    phases: List[LRPhase] = field(default_factory=list)  # [] = one phase: trainer.steps at learner.lr


def phases_of(cfg: ScheduleConfig, total_steps: int, base_lr: float) -> List[Tuple[int, float]]:
    return [(p.steps, p.lr) for p in cfg.phases] if cfg.phases else [(total_steps, base_lr)]


def lr_at(step: int, cfg: ScheduleConfig, total_steps: int, base_lr: float) -> float:
    """The learning rate of GRPO step `step` (1-based): a phase's first step trains at its lr,
    its last at final_ratio x lr (linear, cosine); warmup scales the run's first steps."""
    decay = DECAYS.get(cfg.name)
    start, lr = 0, base_lr
    phases = phases_of(cfg, total_steps, base_lr)
    for length, lr in phases:
        if step <= start + length:
            break
        start += length
    else:  # past the last phase: stay at its end
        length, lr = phases[-1]
        start = sum(n for n, _ in phases) - length
    progress = min(max(step - 1 - start, 0) / max(length - 1, 1), 1.0)
    value = lr * decay(progress, cfg.final_ratio)
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        value *= step / (cfg.warmup_steps + 1)
    return value


def problems(cfg: ScheduleConfig, total_steps: int, prefix: str = "learner.schedule") -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    if cfg.name not in DECAYS:
        out.append((f"{prefix}.name", f"{cfg.name!r} not in {DECAYS.names()}"))
    if cfg.warmup_steps < 0 or (cfg.warmup_steps > 0 and cfg.warmup_steps >= total_steps):
        out.append((f"{prefix}.warmup_steps", f"{cfg.warmup_steps} must be >= 0 and shorter than the run "
                    f"(trainer.steps {total_steps})"))
    if not 0.0 <= cfg.final_ratio <= 1.0:
        out.append((f"{prefix}.final_ratio", f"must be in [0, 1], got {cfg.final_ratio}"))
    if cfg.phases:
        if any(p.steps < 1 or p.lr <= 0 for p in cfg.phases):
            out.append((f"{prefix}.phases", "every phase needs steps >= 1 and lr > 0"))
        elif sum(p.steps for p in cfg.phases) != total_steps:
            out.append((f"{prefix}.phases", f"the phases add up to {sum(p.steps for p in cfg.phases)} steps, "
                        f"trainer.steps is {total_steps}"))
    return out
