"""What is wrong with the task side of a config (vlcot/config.py's sections), as (full key,
message) pairs.

`problems()` checks image sizes and their patch arithmetic, the VQ tokenizer, the policy, the
degradation synthesis, the data options, `annotate` and `vq_train`, and returns every problem it
finds; it raises nothing. `cluster/config.py` gathers these with every other package's problems
and the cross-role checks, and refuses the config once, naming each key. A check that needs a
value an earlier check found bad (a modulo by patch_px 0, the head size of 0 heads) is skipped,
so one mistake is reported once, not as a crash or a cascade.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

from vlcot.config import (LABEL_MEASURES, AnnotateConfig, DataConfig, DegradationConfig, ImageConfig, OrderConfig,
                          PolicyConfig, VQConfig, VQTrainConfig, policy_folder_problem, resolve_checkpoint)
from vlcot.conversation import conversation_problems
from vlcot.kernels import KERNEL_TYPES

Problems = List[Tuple[str, str]]

POLICY_INITS = ("tiny", "released-layout")  # policy.init: how an empty policy.checkpoint is built
DTYPES = ("float32", "bfloat16", "float16")
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # vLLM CPU attention; GPU kernels cover these too
VQ_DOWNSAMPLE = 8


def problems(*, image: ImageConfig, vq: VQConfig, policy: PolicyConfig, degradation: DegradationConfig,
             data: DataConfig, annotate: AnnotateConfig, vq_train: VQTrainConfig) -> Problems:
    """Every problem of vlcot's config sections, each as (full key, message)."""
    return (image_problems(image) + vq_problems(vq) + policy_problems(policy, image)
            + degradation_problems(degradation) + data_problems(data) + annotate_problems(annotate)
            + vq_train_problems(vq_train))


def image_problems(im: ImageConfig) -> Problems:
    sizes = ("hr_size", "lr_size", "prompt_size", "patch_px")
    out = [(f"image.{name}", f"must be positive, got {getattr(im, name)}") for name in sizes if getattr(im, name) <= 0]
    if out:
        return out  # the arithmetic below divides by these
    if im.patch_px % VQ_DOWNSAMPLE:
        out.append(("image.patch_px", f"must be a multiple of the VQ downsample {VQ_DOWNSAMPLE}, got {im.patch_px}"))
    if im.hr_size % (4 * im.patch_px):
        out.append(("image.hr_size", f"must be a multiple of 4 x patch_px = {4 * im.patch_px} (the rough image is "
                                     f"HR/4), got {im.hr_size}"))
    if im.prompt_size % im.patch_px:
        out.append(("image.prompt_size", f"must be a multiple of patch_px {im.patch_px}, got {im.prompt_size}"))
    if im.hr_size % im.lr_size:
        out.append(("image.lr_size", f"must divide hr_size {im.hr_size}, got {im.lr_size}"))
    return out


def vq_problems(vq: VQConfig) -> Problems:
    out: Problems = []
    if len(vq.block_out_channels) != 4:
        out.append(("vq.block_out_channels", f"needs 4 levels for x8 downsampling, got {list(vq.block_out_channels)}"))
    channels = list(vq.block_out_channels) + [vq.z_channels]
    if vq.norm_num_groups < 1 or any(c % vq.norm_num_groups for c in channels):
        out.append(("vq.norm_num_groups", f"must divide every channel count {list(vq.block_out_channels)} and z "
                                          f"{vq.z_channels}"))
    if vq.codebook_size < 2 or vq.codebook_dim < 1 or vq.layers_per_block < 1:
        out.append(("vq", "codebook_size >= 2, codebook_dim >= 1 and layers_per_block >= 1 are required"))
    if vq.checkpoint:
        try:
            path = resolve_checkpoint(vq.checkpoint)
        except ValueError as exc:
            out.append(("vq.checkpoint", str(exc)))
        else:
            if not path.exists():
                out.append(("vq.checkpoint", f"no such file or directory: {path}"))
    if vq.weights not in ("model", "ema"):
        out.append(("vq.weights", f"{vq.weights!r} not in ['model', 'ema']"))
    return out


def policy_problems(pol: PolicyConfig, im: ImageConfig) -> Problems:
    out: Problems = []
    if pol.dtype not in DTYPES:
        out.append(("policy.dtype", f"{pol.dtype!r} not in {list(DTYPES)}"))
    if pol.init not in POLICY_INITS:
        out.append(("policy.init", f"{pol.init!r} not in {list(POLICY_INITS)}"))
    out += conversation_problems(pol.conversation)
    if pol.checkpoint:
        path = Path(pol.checkpoint)
        if not (path / "config.json").is_file():
            out.append(("policy.checkpoint", f"{path} is not an HF-layout directory with config.json"))
        else:
            why = policy_folder_problem(path, files=False)  # weights and tokenizer: when a command loads it
            if why:
                out.append(("policy.checkpoint", why))
    m = pol.model
    if m.num_attention_heads < 1 or m.num_key_value_heads < 1:
        out.append(("policy.model", f"num_attention_heads and num_key_value_heads must be >= 1, got "
                                    f"{m.num_attention_heads} and {m.num_key_value_heads}"))
    elif m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_key_value_heads:
        out.append(("policy.model", "hidden_size must divide by num_attention_heads, which must divide by "
                                    "num_key_value_heads"))
    elif m.hidden_size // m.num_attention_heads not in VLLM_HEAD_DIMS:
        out.append(("policy.model", f"head_dim = hidden_size / num_attention_heads = "
                                    f"{m.hidden_size // m.num_attention_heads}; vLLM's attention kernels need one of "
                                    f"{list(VLLM_HEAD_DIMS)}"))
    if m.text_vocab_size < 300:
        out.append(("policy.model.text_vocab_size", f"must be >= 300 (256 bytes + special and tag tokens), got "
                                                    f"{m.text_vocab_size}"))
    if im.patch_px > 0:  # else image_problems names patch_px
        side = max(im.hr_size, im.prompt_size)
        if pol.special_tokens.max_grid < side // im.patch_px:
            out.append(("policy.special_tokens.max_grid", f"must be >= {side // im.patch_px} patches for a {side} px "
                                                          "image"))
    return out


def _prob(key: str, v: float) -> Problems:
    return [] if 0.0 <= v <= 1.0 else [(key, f"must be a probability in [0, 1], got {v}")]


def _range(key: str, v: Sequence[float], lo: float = float("-inf")) -> Problems:
    if len(v) != 2 or v[0] > v[1] or v[0] < lo:
        return [(key, f"must be [low, high] with {lo} <= low <= high, got {list(v)}")]
    return []


def _monotone(key: str, v: Sequence[float], increasing: bool) -> Problems:
    if len(v) == 3 and all((a < b) if increasing else (a > b) for a, b in zip(v, v[1:])):
        return []
    order = "increasing" if increasing else "decreasing"
    return [(key, f"must be 3 strictly {order} edges (none|light|medium|heavy), got {list(v)}")]


def _weights_problem(w: Sequence[float], count: int) -> bool:
    """True unless `w` is `count` non-negative weights, not all zero."""
    return len(w) != count or not w or min(w) < 0 or sum(w) <= 0


def order_problems(prefix: str, o: OrderConfig) -> Problems:
    """One degradation order (`degradation.first` or `.second`)."""
    b = o.blur
    out = [p for name in ("prob", "sinc_prob") for p in _prob(f"{prefix}.blur.{name}", getattr(b, name))]
    for name in ("gaussian_noise_prob", "gray_noise_prob", "noise_prob", "jpeg_prob"):
        out += _prob(f"{prefix}.{name}", getattr(o, name))
    if not b.kernel_sizes or any(k < 3 or k % 2 == 0 for k in b.kernel_sizes):
        out.append((f"{prefix}.blur.kernel_sizes", f"must be odd sizes >= 3, got {list(b.kernel_sizes)}"))
    unknown = [t for t in b.kernel_types if t not in KERNEL_TYPES]
    if unknown or not b.kernel_types:
        out.append((f"{prefix}.blur.kernel_types", f"unknown {unknown}; allowed: {list(KERNEL_TYPES)}"))
    if _weights_problem(b.kernel_probs, len(b.kernel_types)):
        out.append((f"{prefix}.blur.kernel_probs", "must be non-negative, one per kernel type, not all zero"))
    for name in ("sigma", "betag", "betap"):
        out += _range(f"{prefix}.blur.{name}", getattr(b, name), lo=1e-3)
    if _weights_problem(o.resize_probs, 3):
        out.append((f"{prefix}.resize_probs", "must be 3 non-negative weights (up, down, keep), not all zero"))
    bad_range = _range(f"{prefix}.resize_range", o.resize_range, lo=1e-3)
    if not bad_range and not o.resize_range[0] <= 1.0 <= o.resize_range[1]:
        bad_range = [(f"{prefix}.resize_range", f"must contain 1.0, got {list(o.resize_range)}")]
    out += bad_range + _range(f"{prefix}.noise_sigma", o.noise_sigma, lo=0.0)
    out += _range(f"{prefix}.poisson_scale", o.poisson_scale, lo=0.0)
    bad_quality = _range(f"{prefix}.jpeg_quality", o.jpeg_quality, lo=1)
    if not bad_quality and o.jpeg_quality[1] > 100:
        bad_quality = [(f"{prefix}.jpeg_quality", f"quality must be <= 100, got {list(o.jpeg_quality)}")]
    return out + bad_quality


def degradation_problems(d: DegradationConfig) -> Problems:
    out = order_problems("degradation.first", d.first) + order_problems("degradation.second", d.second)
    out += _prob("degradation.second_order_prob", d.second_order_prob)
    out += _prob("degradation.final_sinc_prob", d.final_sinc_prob)
    t = d.thresholds
    out += _monotone("degradation.thresholds.blur_sigma", t.blur_sigma, increasing=True)
    out += _monotone("degradation.thresholds.noise_std", t.noise_std, increasing=True)
    out += _monotone("degradation.thresholds.jpeg_quality", t.jpeg_quality, increasing=False)
    if t.measure not in LABEL_MEASURES:
        out.append(("degradation.thresholds.measure", f"must be one of {list(LABEL_MEASURES)}, got {t.measure!r}"))
    for name in ("lr_blur_rms", "lr_noise_rms", "lr_jpeg_rms"):
        out += _monotone(f"degradation.thresholds.{name}", getattr(t, name), increasing=True)
    if not 0 <= t.resize_tolerance < 1:
        out.append(("degradation.thresholds.resize_tolerance", f"must be in [0, 1), got {t.resize_tolerance}"))
    return out


def data_problems(data: DataConfig) -> Problems:
    out: Problems = []
    if data.input_dir and not Path(data.input_dir).is_dir():
        out.append(("data.input_dir", f"not a folder: {data.input_dir} (give a folder of photographs, or leave it "
                                      "empty for the built-in set)"))
    if data.min_side < 1 or data.max_pixels < 1 or data.variants_per_image < 1:
        out.append(("data", "min_side, max_pixels and variants_per_image must be >= 1"))
    if data.crops_per_image < 0 or data.heldout_per_image < 0:
        out.append(("data", f"crops_per_image and heldout_per_image must be >= 0, got {data.crops_per_image} and "
                            f"{data.heldout_per_image}"))
    if not 0 < data.crop_min_scale <= 1:
        out.append(("data.crop_min_scale", f"must be in (0, 1], got {data.crop_min_scale}"))
    return out


def annotate_problems(cfg: AnnotateConfig) -> Problems:
    out: Problems = []
    if sorted(cfg.prompts) != ["x1", "x2", "x4"] or not all(isinstance(v, str) for v in cfg.prompts.values()):
        out.append(("annotate.prompts", f"must give a prompt for each of x4, x2, x1, got {sorted(cfg.prompts)}"))
    if cfg.batch_size < 1 or cfg.max_tags < 1 or cfg.max_new_tokens < 1 or not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:
        out.append(("annotate", "batch_size, max_tags and max_new_tokens must be >= 1, min_new_tokens in "
                    "[0, max_new_tokens]"))
    if not 0.0 <= cfg.score_threshold <= 1.0:
        out.append(("annotate.score_threshold", f"must be in [0, 1], got {cfg.score_threshold}"))
    if cfg.detector and not cfg.vocabulary:
        out.append(("annotate.vocabulary", "a detector needs words to look for"))
    return out


def vq_train_problems(cfg: VQTrainConfig) -> Problems:
    out: Problems = []
    if cfg.crop < 8 or cfg.crop % 8:
        out.append(("vq_train.crop", f"must be a positive multiple of 8, got {cfg.crop}"))
    if cfg.autoencoder_steps < 0 or cfg.quantised_steps < 1 or cfg.batch_size < 1:
        out.append(("vq_train", "autoencoder_steps >= 0, quantised_steps >= 1 and batch_size >= 1 are required"))
    if cfg.kmeans_crops < 1 or cfg.kmeans_iters < 1:
        out.append(("vq_train", "kmeans_crops and kmeans_iters must be >= 1"))
    if not cfg.scales or any(not 0 < s <= 1 for s in cfg.scales):
        out.append(("vq_train.scales", f"each scale must be in (0, 1], got {list(cfg.scales)}"))
    if cfg.lr <= 0 or not 0 < cfg.min_lr_ratio <= 1 or not 0 <= cfg.channel_shuffle_prob <= 1:
        out.append(("vq_train", "lr > 0, min_lr_ratio in (0, 1] and channel_shuffle_prob in [0, 1] are required"))
    return out
