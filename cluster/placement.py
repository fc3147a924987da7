"""Ray placement groups for a training run: a bundle per actor, reserved before any starts.

On GPU clusters this reserves every actor's GPUs/CPUs up front (no half-started run waiting
for a GPU that another job took). Each role has a group of its own with its own strategy:
learner ranks PACK (as few nodes as possible: DeepSpeed's collectives stay on NVLink where
they can), rollout workers SPREAD (one per node where possible: a lost node takes few of
them), reward workers PACK. Used when `trainer.placement` is "enabled", or "auto" and any role
asks for GPUs. A role's custom `resources` go into its bundles.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import Config

Placement = Callable[[int], Dict[str, Any]]
STRATEGIES = {"learner": "PACK", "rollout": "SPREAD", "rewards": "PACK"}


def wanted(cfg: Config) -> bool:
    mode = cfg.trainer.placement
    gpus = cfg.learner.num_gpus + cfg.rollout.gpus_per_worker + cfg.rewards.num_gpus
    return mode == "enabled" or (mode == "auto" and gpus > 0)


def _bundle(cpus: float, gpus: float, resources: Dict[str, float]) -> Dict[str, float]:
    b = {"CPU": float(cpus), **{k: float(v) for k, v in resources.items()}}
    if gpus > 0:
        b["GPU"] = float(gpus)
    return b


class RunPlacement:
    def __init__(self, cfg: Config, timeout_s: float = 600.0):
        roles = {
            "learner": (cfg.learner.num_workers, _bundle(cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources)),
            "rollout": (cfg.rollout.num_workers, _bundle(cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker,
                                                         cfg.rollout.resources)),
            "rewards": (cfg.rewards.num_workers, _bundle(cfg.rewards.num_cpus, cfg.rewards.num_gpus, cfg.rewards.resources)),
        }
        self.bundles: Dict[str, List[Dict[str, float]]] = {name: [b] * n for name, (n, b) in roles.items()}
        self.groups = {name: placement_group(bundles, strategy=STRATEGIES[name])
                       for name, bundles in self.bundles.items()}
        ready, _ = ray.wait([g.ready() for g in self.groups.values()], num_returns=len(self.groups), timeout=timeout_s)
        if len(ready) < len(self.groups):
            self.remove()
            raise RuntimeError(f"the cluster cannot reserve the run's resources within {timeout_s:.0f}s: "
                               f"{self.bundles}; it has {ray.available_resources()} free")

    def __len__(self) -> int:
        return sum(len(b) for b in self.bundles.values())

    def for_role(self, name: str) -> Placement:
        group = self.groups[name]
        return lambda i: {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=i)}

    def remove(self) -> None:
        for group in self.groups.values():
            remove_placement_group(group)
