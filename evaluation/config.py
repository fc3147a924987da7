"""Typed defaults of `realsr-r1 infer` and `realsr-r1 eval` (merged by cluster/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from evaluation.image_metrics import METRICS

INFER_MODES = ("tile", "resize")
INFER_ENGINES = ("hf", "vllm")


@dataclass
class InferConfig:
    """How one image of any size becomes model inputs.

    mode "tile" (default): the LR image is cut into `image.lr_size` tiles that overlap by
    `tile_overlap` LR pixels; each tile is super-resolved at the scale the model was trained
    on (hr_size / lr_size) and the outputs are feather-blended. Inputs smaller than a tile
    are edge-padded and cropped back. Output = scale x input, every LR pixel kept.
    mode "resize": the whole image is bicubic-resized to one lr_size square and the outputs
    resized back to scale x the input size (fast, one generation, loses detail and
    distorts aspect inside the model; for thumbnails).
    An image needing more than `max_tiles` tiles is first downscaled until it fits
    (recorded as `prescale` in its JSON).
    """

    mode: str = "tile"
    tile_overlap: int = 8
    max_tiles: int = 64
    engine: str = "hf"  # hf (supports CFG, loads instantly) | vllm (fast batched generation on GPUs)
    greedy: bool = False  # False: the rollout sampling rules (rollout.sampling); True: argmax everywhere
    # the trace's skeleton as decoding rules (rollout.sampling.skeleton): every tile's response has
    # the seven tags and all three images, so no tile falls back to bicubic for a malformed trace.
    # Off by default: eval then measures the policy's own format, as the paper's CoT check does
    constrained: bool = False
    seed: int = 0
    batch_tiles: int = 16  # tiles per generate call
    device: str = "auto"  # auto = cuda when available


@dataclass
class EvalConfig:
    """`realsr-r1 eval`: which metrics, where their weights live, how the work is spread."""

    metrics: List[str] = field(default_factory=lambda: [
        "psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "maniqa_pipal", "clipiqa", "topiq_nr",
        "topiq_nr_spaq", "fid"])
    weights_dir: str = ""  # local metric weights (see evaluation/image_metrics.py for file names)
    crop_border: int = 0  # pixels cropped from each side before PSNR/SSIM (pyiqa's default 0)
    num_workers: int = 1  # Ray actors per stage (generation, metrics); 0 = everything in this process
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    grid_images: int = 4  # side-by-side grids for the first N images
    out_dir: str = ""  # "" = <run_dir>/eval


def problems(infer: InferConfig, ev: EvalConfig) -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    if infer.mode not in INFER_MODES:
        out.append(("infer.mode", f"{infer.mode!r} not in {list(INFER_MODES)}"))
    if infer.engine not in INFER_ENGINES:
        out.append(("infer.engine", f"{infer.engine!r} not in {list(INFER_ENGINES)}"))
    if infer.tile_overlap < 0 or infer.max_tiles < 1 or infer.batch_tiles < 1:
        out.append(("infer", "tile_overlap >= 0, max_tiles >= 1 and batch_tiles >= 1 are required"))
    unknown = [m for m in ev.metrics if m not in METRICS]
    if unknown:
        out.append(("eval.metrics", f"unknown {unknown}; known: {list(METRICS)}"))
    if ev.num_workers < 0 or ev.crop_border < 0 or ev.grid_images < 0:
        out.append(("eval", "num_workers, crop_border and grid_images must be >= 0"))
    return out
