"""Ray workers that spread evaluation over a cluster: generation and metrics, each sharded.

Generation runs where the policy engine runs (the main environment); metrics run in the
IQA environment (pyiqa), like the reward workers. Both wrap the same classes the in-process
path uses, so one machine and a cluster compute the same numbers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray

from evaluation.infer import SuperResolver, run_infer
from evaluation.image_metrics import MetricSuite, score_pairs


def shards(n: int, k: int) -> List[List[int]]:
    """Indices 0..n-1 in k contiguous, near-equal, non-empty shards (fewer when n < k)."""
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return [s for s in out if s]


@ray.remote
class InferWorker:
    def __init__(self, cfg, policy_dir: str, vq_dir: str):
        import torch

        torch.set_num_threads(max(1, int(cfg.eval.num_cpus)))
        self.resolver = SuperResolver(cfg, policy_dir, vq_dir)

    def ready(self) -> bool:
        return True

    def run(self, files: Sequence[str], names: Sequence[str], out_dir: str) -> List[Dict[str, Any]]:
        from pathlib import Path

        return run_infer(self.resolver, [Path(f) for f in files], names, out_dir, progress=False)


@ray.remote
class MetricWorker:
    def __init__(self, names: Sequence[str], weights_dir: str, crop_border: int, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.suite = MetricSuite(names, weights_dir, crop_border, device)

    def ready(self) -> bool:
        return True

    def score(self, pairs: Sequence[Tuple[str, Optional[str]]]):
        return score_pairs(self.suite, pairs)

    def score_sets(self, groups: Sequence[Tuple[Sequence[str], Sequence[str]]]) -> List[Dict[str, Optional[float]]]:
        """Set-level metrics (FID) for each (SR paths, HR paths) group."""
        return [self.suite.score_set(sr, hr) for sr, hr in groups]

