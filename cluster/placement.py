"""One Ray placement group for a training run: a bundle per actor, reserved together.

On GPU clusters this reserves every actor's GPUs/CPUs atomically (no half-started run
waiting for a GPU that another job took) and packs them (PACK: as few nodes as possible;
`STRICT_PACK` keeps one node, e.g. for NVLink/SHM weight broadcast). Used when
`trainer.placement` is "enabled", or "auto" and any role asks for GPUs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import Config

Placement = Callable[[int], Dict[str, Any]]


def wanted(cfg: Config) -> bool:
    mode = cfg.trainer.placement
    gpus = cfg.learner.num_gpus + cfg.rollout.gpus_per_worker + cfg.rewards.num_gpus
    return mode == "enabled" or (mode == "auto" and gpus > 0)


def _bundle(cpus: float, gpus: float) -> Dict[str, float]:
    b = {"CPU": float(cpus)}
    if gpus > 0:
        b["GPU"] = float(gpus)
    return b


class RunPlacement:
    """Bundles: learner ranks, then rollout workers, then reward actors."""

    def __init__(self, cfg: Config, strategy: str = "PACK", timeout_s: float = 600.0):
        roles: List[Tuple[str, int, float, float]] = [
            ("learner", cfg.learner.num_workers, cfg.learner.num_cpus, cfg.learner.num_gpus),
            ("rollout", cfg.rollout.num_workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker),
            ("rewards", cfg.rewards.num_workers, cfg.rewards.num_cpus, cfg.rewards.num_gpus),
        ]
        bundles, self.offsets = [], {}
        for name, n, cpus, gpus in roles:
            self.offsets[name] = len(bundles)
            bundles += [_bundle(cpus, gpus) for _ in range(n)]
        self.pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the cluster cannot reserve the run's resources within {timeout_s:.0f}s: {bundles}")
        self.bundles = bundles

    def for_role(self, name: str) -> Placement:
        base = self.offsets[name]
        return lambda i: {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=base + i)}

    def remove(self) -> None:
        remove_placement_group(self.pg)
