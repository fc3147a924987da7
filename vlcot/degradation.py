"""Real-ESRGAN-style second-order degradation that records everything it drew, and the
labeller that turns those records into the five published degradation words.

Order 1: blur -> random resize -> noise -> JPEG. Order 2 (with probability
`second_order_prob`): blur -> resize to (LR size x random scale) -> noise. Final: resize to
the LR size plus an optional sinc filter, and JPEG, in random order. Same seed, same output.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlcot.config import DegradationConfig, LabelThresholds, OrderConfig
from vlcot.kernels import kernel_std, random_kernel, sinc_kernel

INTERPOLATIONS = ("area", "bilinear", "bicubic")


# ---- primitive operations on [1, 3, H, W] float tensors in [0, 1] -----------------------
def _filter(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    k = torch.from_numpy(kernel).to(img.dtype)
    pad = kernel.shape[0] // 2
    mode = "reflect" if pad < min(img.shape[-2:]) else "replicate"
    padded = F.pad(img, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, k[None, None].repeat(3, 1, 1, 1), groups=3)


def _resize(img: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


class PoissonStates:
    """Where the random stream stands after each Poisson draw of one synthesis.

    Poisson sampling takes a count of random numbers that depends on the image. A synthesis
    run again with an effect left out sees other pixels at a Poisson draw, so it would read
    its later parameters from another place in the stream. The full run records the stream
    state after each Poisson draw; a rerun sets the stream back to it, and every later draw
    (JPEG quality, second-order resize, ...) is the full run's."""

    def __init__(self, recorded: Optional[List[Dict[str, Any]]] = None):
        self.replay = recorded is not None
        self.states: List[Dict[str, Any]] = list(recorded or [])
        self._next = 0

    def after_draw(self, rng: np.random.Generator) -> None:
        if self.replay:
            rng.bit_generator.state = self.states[self._next]
            self._next += 1
        else:
            self.states.append(rng.bit_generator.state)


def _add_noise(img: torch.Tensor, rng: np.random.Generator, cfg: OrderConfig,
               poisson_states: PoissonStates) -> Tuple[torch.Tensor, Dict[str, Any]]:
    gray = bool(rng.random() < cfg.gray_noise_prob)
    shape = (1, 1, *img.shape[-2:]) if gray else tuple(img.shape)
    if rng.random() < cfg.gaussian_noise_prob:
        sigma = float(rng.uniform(*cfg.noise_sigma))
        noise = torch.from_numpy(rng.standard_normal(shape)).to(img.dtype) * (sigma / 255.0)
        params = {"type": "gaussian", "sigma": sigma, "gray": gray}
    else:
        scale = float(rng.uniform(*cfg.poisson_scale))
        base = img.mean(dim=1, keepdim=True) if gray else img
        arr = base.clamp(0, 1).numpy()
        levels = len(np.unique(np.round(arr * 255)))
        vals = float(2 ** np.ceil(np.log2(max(levels, 2))))
        noisy = rng.poisson(arr * vals) / vals
        poisson_states.after_draw(rng)
        noise = torch.from_numpy(noisy - arr).to(img.dtype) * scale
        params = {"type": "poisson", "scale": scale, "gray": gray}
    noise = noise.expand_as(img)
    params["measured_std"] = float(noise.std() * 255.0)
    return img + noise, params


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1)[None].to(img.dtype)


# ---- one order ----------------------------------------------------------------------------
def _blur(img, rng, order: OrderConfig, off: bool):
    if rng.random() >= order.blur.prob:
        return img, {"applied": False, "std": 0.0}
    kernel, params = random_kernel(rng, order.blur)
    params.update(applied=True, std=kernel_std(kernel))
    return (img if off else _filter(img, kernel)), params


def _random_scale(rng, order: OrderConfig) -> Tuple[str, float]:
    probs = np.asarray(order.resize_probs, dtype=np.float64)
    direction = str(rng.choice(["up", "down", "keep"], p=probs / probs.sum()))
    lo, hi = order.resize_range
    if direction == "up":
        return direction, float(rng.uniform(1.0, hi))
    if direction == "down":
        return direction, float(rng.uniform(lo, 1.0))
    return direction, 1.0


def _noise_and_jpeg(img, rng, order: OrderConfig, with_jpeg: bool, without: frozenset, poisson_states: PoissonStates):
    params: Dict[str, Any] = {}
    if rng.random() < order.noise_prob:
        noisy, params["noise"] = _add_noise(img, rng, order, poisson_states)
        img = img if "noise" in without else noisy
    else:
        params["noise"] = {"type": "none", "measured_std": 0.0}
    img = img.clamp(0, 1)
    if with_jpeg:
        if rng.random() < order.jpeg_prob:
            q = int(rng.integers(order.jpeg_quality[0], order.jpeg_quality[1] + 1))
            img = img if "jpeg" in without else _jpeg(img, q)
            params["jpeg_quality"] = q
        else:
            params["jpeg_quality"] = None
    return img, params


# ---- the pipeline --------------------------------------------------------------------------
EFFECTS = frozenset({"blur", "noise", "jpeg"})


def degrade(hr: np.ndarray, lr_size: Tuple[int, int], cfg: DegradationConfig, seed: int) -> Tuple[np.ndarray, Dict[str, Any]]:
    """HR uint8 [H, W, 3] -> (LR uint8 [lr_h, lr_w, 3], every parameter drawn + derived strengths).

    Deterministic for (hr, lr_size, cfg, seed). With `thresholds.measure: lr` the strengths
    also hold what each effect left in the LR (`lr_strengths`), for the labeller.
    """
    if hr.ndim != 3 or hr.shape[2] != 3 or hr.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {hr.dtype} {hr.shape}")
    states = PoissonStates()
    lr, p = _synthesise(hr, lr_size, cfg, seed, frozenset(), states)
    if cfg.thresholds.measure == "lr":
        p["strength"].update(lr_strengths(hr, lr, lr_size, cfg, seed, states))
    return lr, p


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def lr_strengths(hr: np.ndarray, lr: np.ndarray, lr_size: Tuple[int, int], cfg: DegradationConfig,
                 seed: int, poisson_states: PoissonStates) -> Dict[str, float]:
    """How much blur, noise and JPEG changed the LR, in RMS 0..255 units: the same draw (same
    seed, same parameters; `poisson_states` recorded by the run that made `lr`) synthesised
    again with the effect left out.

    - lr_noise_rms: LR vs the LR without noise (both orders);
    - lr_jpeg_rms: LR vs the LR without JPEG (both places it is applied);
    - lr_blur_rms: without noise and JPEG, the LR vs the LR with no blur kernel either
      (both orders' kernels and the final sinc): the detail blur removed, as the LR shows it.
    A strong effect the downscale then erased measures small: the label says what the LR shows.
    """
    def without(effects):
        return _synthesise(hr, lr_size, cfg, seed, frozenset(effects), PoissonStates(poisson_states.states))[0]

    clean = without({"noise", "jpeg"})
    return {
        "lr_noise_rms": _rms(lr, without({"noise"})),
        "lr_jpeg_rms": _rms(lr, without({"jpeg"})),
        "lr_blur_rms": _rms(clean, without(EFFECTS)),
    }


def _synthesise(hr: np.ndarray, lr_size: Tuple[int, int], cfg: DegradationConfig, seed: int,
                without: frozenset, poisson_states: PoissonStates) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The pipeline. `without` leaves effects out (blur kernels, noise, JPEG) while drawing
    every random number as usual; with replayed `poisson_states` the rest of the draw is the
    recorded run's."""
    rng = np.random.default_rng(seed)
    h, w = hr.shape[:2]
    lr_h, lr_w = lr_size
    img = torch.from_numpy(hr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    p: Dict[str, Any] = {"seed": int(seed), "hr_size": [h, w], "lr_size": [lr_h, lr_w]}

    # order 1
    img, p["blur1"] = _blur(img, rng, cfg.first, "blur" in without)
    direction, r1 = _random_scale(rng, cfg.first)
    mode = str(rng.choice(INTERPOLATIONS))
    img = _resize(img, (h * r1, w * r1), mode)
    p["resize1"] = {"direction": direction, "scale": r1, "mode": mode, "size": list(img.shape[-2:])}
    img, o1 = _noise_and_jpeg(img, rng, cfg.first, True, without, poisson_states)
    p["noise1"], p["jpeg1"] = o1["noise"], o1["jpeg_quality"]

    # order 2
    p["second_order"] = bool(rng.random() < cfg.second_order_prob)
    if p["second_order"]:
        before = list(img.shape[-2:])
        img, p["blur2"] = _blur(img, rng, cfg.second, "blur" in without)
        direction2, r2 = _random_scale(rng, cfg.second)
        mode2 = str(rng.choice(INTERPOLATIONS))
        img = _resize(img, (lr_h * r2, lr_w * r2), mode2)
        p["resize2"] = {"direction": direction2, "scale": r2, "mode": mode2, "from": before, "size": list(img.shape[-2:])}
        img, o2 = _noise_and_jpeg(img, rng, cfg.second, False, without, poisson_states)
        p["noise2"] = o2["noise"]

    # final: resize to LR (+ sinc) and JPEG, in random order
    pre_final = list(img.shape[-2:])
    final_mode = str(rng.choice(INTERPOLATIONS))
    use_sinc = bool(rng.random() < cfg.final_sinc_prob)
    sinc = None
    if use_sinc:
        size = int(rng.choice(cfg.second.blur.kernel_sizes))
        omega = float(rng.uniform(np.pi / 3, np.pi))
        sinc = sinc_kernel(size, omega)
        p["final_sinc"] = {"size": size, "omega_c": omega, "std": kernel_std(sinc)}
    else:
        p["final_sinc"] = None
    jpeg_first = bool(rng.random() < 0.5)
    q = int(rng.integers(cfg.second.jpeg_quality[0], cfg.second.jpeg_quality[1] + 1)) if rng.random() < cfg.second.jpeg_prob else None

    def resize_and_sinc(x):
        x = _resize(x, (lr_h, lr_w), final_mode)
        return _filter(x, sinc) if sinc is not None and "blur" not in without else x

    jpeg = q is not None and "jpeg" not in without
    if jpeg_first:
        img = _jpeg(img.clamp(0, 1), q) if jpeg else img
        img = resize_and_sinc(img)
    else:
        img = resize_and_sinc(img)
        img = _jpeg(img.clamp(0, 1), q) if jpeg else img
    p["final"] = {"mode": final_mode, "from": pre_final, "jpeg_first": jpeg_first, "jpeg_quality": q}
    lr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)

    p["strength"] = strengths(p)
    return lr, p


def usm_sharpen(img: np.ndarray, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> np.ndarray:
    """Unsharp masking as Real-ESRGAN sharpens its ground truth: add `weight` x the detail the
    Gaussian blur removes, only where that detail exceeds `threshold` (0..255; the mask itself
    blurred so the edit fades in). uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a kernel of this size
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    t = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    detail = t - _filter(t, kernel)
    soft = _filter((detail.abs() * 255.0 > threshold).float(), kernel)
    sharp = (t + weight * detail).clamp(0.0, 1.0)
    out = soft * sharp + (1.0 - soft) * t
    return (out[0].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def strengths(p: Dict[str, Any]) -> Dict[str, float]:
    """The scalar strengths the labeller thresholds, derived from the drawn parameters."""
    h = p["hr_size"][0]
    r1 = p["resize1"]["scale"]
    blur = p["blur1"]["std"] ** 2
    noise = p["noise1"]["measured_std"] ** 2
    qualities = [q for q in (p.get("jpeg1"), p["final"]["jpeg_quality"]) if q is not None]
    if p["second_order"]:
        # order 2 works on an image already resized by r1: its kernel std in HR pixels is s2 / r1
        blur += (p["blur2"]["std"] / r1) ** 2
        noise += p["noise2"]["measured_std"] ** 2
        r_net = r1 * p["resize2"]["size"][0] / p["resize2"]["from"][0]
    else:
        r_net = r1
    if p["final_sinc"] is not None:
        blur += (p["final_sinc"]["std"] * h / p["lr_size"][0]) ** 2
    return {
        "blur_sigma": float(np.sqrt(blur)),
        "noise_std": float(np.sqrt(noise)),
        "jpeg_quality": float(min(qualities)) if qualities else 100.0,
        "resize_scale": float(r1),
        "net_random_scale": float(r_net),
        "final_scale": float(p["lr_size"][0] / p["final"]["from"][0]),
    }


# ---- labeller ------------------------------------------------------------------------------
LEVEL_WORDS = ("none", "light", "medium", "heavy")


def level_increasing(value: float, edges: List[float]) -> str:
    """First edge e with value < e gives its level; past the last edge is 'heavy'."""
    for word, edge in zip(LEVEL_WORDS, edges):
        if value < edge:
            return word
    return LEVEL_WORDS[len(edges)]


def level_decreasing(value: float, edges: List[float]) -> str:
    """For JPEG quality (lower is stronger): first edge e with value > e gives its level."""
    for word, edge in zip(LEVEL_WORDS, edges):
        if value > edge:
            return word
    return LEVEL_WORDS[len(edges)]


def resize_word(scale: float, tolerance: float) -> str:
    if scale < 1.0 - tolerance:
        return "downsample"
    if scale > 1.0 + tolerance:
        return "upsample"
    return "keep"


def label_degradation(params: Dict[str, Any], thresholds: LabelThresholds) -> List[str]:
    """Parameters of one `degrade` call -> the five slot words
    [blur level, resize, noise level, compression level, final resize]."""
    s = params.get("strength") or strengths(params)
    if thresholds.measure == "lr":
        if "lr_noise_rms" not in s:
            raise ValueError("degradation.thresholds.measure is 'lr' but these parameters hold no LR strengths: "
                             "they come from a degrade() call made with measure 'synthesis'")
        blur = level_increasing(s["lr_blur_rms"], thresholds.lr_blur_rms)
        noise = level_increasing(s["lr_noise_rms"], thresholds.lr_noise_rms)
        compression = level_increasing(s["lr_jpeg_rms"], thresholds.lr_jpeg_rms)
    else:
        blur = level_increasing(s["blur_sigma"], thresholds.blur_sigma)
        noise = level_increasing(s["noise_std"], thresholds.noise_std)
        compression = level_decreasing(s["jpeg_quality"], thresholds.jpeg_quality)
    return [
        blur,
        resize_word(s["resize_scale"], thresholds.resize_tolerance),
        noise,
        compression,
        resize_word(s["final_scale"], thresholds.resize_tolerance),
    ]
