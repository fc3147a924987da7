"""The generation reward's visual expert: pyiqa metrics on the decoded final image.

Each metric's raw value is mapped to [0, 1] by its `MetricSpec` (best/worst), the mapped
scores are aggregated (weighted mean, weighted geometric mean or min), and an optional
full-reference fidelity term against the HR image joins the aggregate with its own weight.
Needs pyiqa: runs inside the reward worker (the IQA environment on CPU machines).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from rewards.config import GenerationConfig, MetricSpec, resolve_metrics

_BOOL = {"true": True, "false": False}


def _option(v: str):
    if isinstance(v, str) and v.lower() in _BOOL:
        return _BOOL[v.lower()]
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def to_unit_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images (same size) -> float [N, 3, H, W] in [0, 1]."""
    return torch.stack([torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in images])


def upsample_short_side(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Bicubic-upsample [N, 3, H, W] so the short side is at least `min_size` (0 = as is)."""
    if not min_size or min(x.shape[-2:]) >= min_size:
        return x
    s = min_size / min(x.shape[-2:])
    size = (round(x.shape[-2] * s), round(x.shape[-1] * s))
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def normalise(value: float, best: float, worst: float) -> float:
    return float(min(1.0, max(0.0, (value - worst) / (best - worst))))


def aggregate(scores: Sequence[float], weights: Sequence[float], how: str) -> float:
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if how == "min":
        return float(s[w > 0].min()) if (w > 0).any() else 0.0
    if w.sum() <= 0:
        return 0.0
    if how == "geomean":
        return float(math.exp((w * np.log(np.clip(s, 1e-6, 1.0))).sum() / w.sum()))
    return float((w * s).sum() / w.sum())


class IQAScorer:
    def __init__(self, cfg: GenerationConfig, device: str = "cpu"):
        import pyiqa

        self.cfg = cfg
        self.device = torch.device(device)
        self.specs: List[MetricSpec] = resolve_metrics(cfg)
        self.metrics = []
        for spec in self.specs:
            kwargs = {k: _option(v) for k, v in spec.options.items()}
            if spec.weights:
                kwargs["pretrained_model_path"] = spec.weights
            self.metrics.append(pyiqa.create_metric(spec.name, device=self.device, as_loss=False, **kwargs))
        self.fidelity = None
        if cfg.fidelity.metric:
            self.fidelity = pyiqa.create_metric(cfg.fidelity.metric, device=self.device, as_loss=False)


    @torch.no_grad()
    def _run(self, metric, x: torch.Tensor, ref: Optional[torch.Tensor] = None) -> List[float]:
        out = metric(x.to(self.device)) if ref is None else metric(x.to(self.device), ref.to(self.device))
        return [float(v) for v in torch.as_tensor(out).reshape(-1).cpu()]

    def score(self, images: Sequence[np.ndarray], refs: Optional[Sequence[Optional[np.ndarray]]] = None
              ) -> List[Tuple[float, Dict[str, float]]]:
        """uint8 [H, W, 3] images (same size in a call is fastest) -> (score in [0, 1],
        {metric: raw value, ...}) each. NaN raw values are passed through for the caller
        to count and replace."""
        if not len(images):
            return []
        x = to_unit_tensor(images)
        raw: Dict[str, List[float]] = {}
        for spec, metric in zip(self.specs, self.metrics):
            raw[spec.name] = self._run(metric, upsample_short_side(x, spec.min_size))
        fid_raw: List[Optional[float]] = [None] * len(images)
        if self.fidelity is not None and refs is not None:
            for i, ref in enumerate(refs):
                if ref is None:
                    continue
                r = to_unit_tensor([ref])
                if r.shape[-2:] != x.shape[-2:]:
                    r = F.interpolate(r, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
                fid_raw[i] = self._run(self.fidelity, x[i:i + 1], r)[0]

        results = []
        for i in range(len(images)):
            details = {name: vals[i] for name, vals in raw.items()}
            scores = [normalise(details[s.name], s.best, s.worst) for s in self.specs]
            weights = [s.weight for s in self.specs]
            if fid_raw[i] is not None:
                f = self.cfg.fidelity
                details[f"fidelity_{f.metric}"] = fid_raw[i]
                scores.append(normalise(fid_raw[i], f.best, f.worst))
                weights.append(f.weight)
            if any(not math.isfinite(v) for v in details.values()):
                results.append((float("nan"), details))
            else:
                results.append((aggregate(scores, weights, self.cfg.aggregate), details))
        return results
