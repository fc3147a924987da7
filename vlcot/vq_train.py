"""`realsr-r1 train-vq`: train the demo's VQ tokenizer on CPU, from photographs that ship with
the project's dependencies, so that the images the tiny policy draws decode to pictures.

Data: the built-in sample set (vlcot/data.py) plus scikit-image's greyscale photographs and
two synthetic colour images, each resized by `vq_train.scales`, sampled as random crops with
flips, 90-degree turns and (sometimes) a random RGB permutation. Photographs the bench holds
out (bench/vq_reconstruction.py) are never read here.

Two phases (settings: `VQTrainConfig`):
  1. autoencoder: encoder -> 1x1 quant conv -> L2-normalised 8-d latent -> decoder, no codebook;
  2. quantised: spherical k-means over latents of `kmeans_crops` crops seeds the codebook, then
     nearest-code lookup (as at inference) with straight-through gradients, a codebook loss
     pulling codes to latents and a commitment loss pulling latents to codes.
Reconstruction loss is MSE + l1_weight * L1 on pixels in [-1, 1]. The output folder is what
`VQTokenizer.load` reads, plus training.json (settings, seed, sources, curve, reference PSNR)
and README.md (how to remake it).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlcot.config import VQConfig, VQTrainConfig
from vlcot.data import builtin_candidates
from vlcot.fidelity import psnr_y
from vlcot.images import to_rgb
from vlcot.vq import VQTokenizer, pil_to_tensor

# scikit-image photographs beside the built-in set (greyscale, used as RGB) and two colour
# synthetics that widen the colour range
EXTRA_SKIMAGE = ("camera", "brick", "grass", "gravel", "moon", "coins", "page", "text", "clock", "cell",
                 "colorwheel", "logo")
TRAINING_FILE = "training.json"
# the crop whose reconstruction PSNR (Y channel) training.json records and the tests reproduce
REFERENCE_IMAGE, REFERENCE_BOX = "astronaut", (192, 64, 320, 192)


def training_images() -> Dict[str, Image.Image]:
    """Every photograph phase 1 and 2 sample from, by name (RGB)."""
    import skimage.data as skd

    out: Dict[str, Image.Image] = {}
    for cand in builtin_candidates():
        if cand.image is not None:  # an optional package's image may be absent
            out[cand.id] = to_rgb(cand.image)
    for name in EXTRA_SKIMAGE:
        out[f"skimage.{name}"] = to_rgb(Image.fromarray(getattr(skd, name)()))
    return out


def reference_crop() -> Image.Image:
    import skimage.data as skd

    return Image.fromarray(getattr(skd, REFERENCE_IMAGE)()).convert("RGB").crop(REFERENCE_BOX)


def reconstruction_psnr(vq: VQTokenizer, image: Image.Image) -> float:
    """Y-channel PSNR (eval's convention) of an image against its encode-decode round trip."""
    rgb = to_rgb(image)
    out = vq.decode_images(vq.encode_images([rgb], rgb.width))[0]
    return psnr_y(np.asarray(out), np.asarray(rgb))


class CropSampler:
    """Random training crops in [-1, 1] from a fixed set of images at several scales."""

    def __init__(self, images: Dict[str, Image.Image], cfg: VQTrainConfig):
        self.crop, self.shuffle_prob = cfg.crop, cfg.channel_shuffle_prob
        self.sources: List[torch.Tensor] = []
        for im in images.values():
            for s in cfg.scales:
                w, h = round(im.width * s), round(im.height * s)
                if min(w, h) >= cfg.crop:
                    self.sources.append(pil_to_tensor(im if s == 1 else im.resize((w, h), Image.BICUBIC)))
        if not self.sources:
            raise ValueError(f"no training image is at least {cfg.crop} px on its shorter side at any scale")
        area = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.sources])
        self.weights = area / area.sum()  # crops in proportion to area: every region equally likely
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def batch(self, n: int) -> torch.Tensor:
        out = []
        picks = torch.multinomial(self.weights, n, replacement=True, generator=self.gen)
        for i in picks.tolist():
            src = self.sources[i]
            y, x = self._randint(src.shape[1] - self.crop + 1), self._randint(src.shape[2] - self.crop + 1)
            c = src[:, y:y + self.crop, x:x + self.crop]
            if self._randint(2):
                c = c.flip(2)
            c = torch.rot90(c, self._randint(4), (1, 2))
            if float(torch.rand((), generator=self.gen)) < self.shuffle_prob:
                c = c[torch.randperm(3, generator=self.gen)]
            out.append(c)
        return torch.stack(out).contiguous()


def latents(vq: VQTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, d, H/8, W/8] L2-normalised latents (what `quantize` looks up)."""
    return F.normalize(vq.quant_conv(vq.encoder(pixels)), dim=1)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    """k unit centroids for unit vectors x [N, d] (cosine k-means). Centroids start at random
    points; an empty cluster is reseeded at a random point (plus a little noise, so that
    duplicates of one latent do not give duplicate codes)."""
    n, d = x.shape
    centroids = x[torch.randint(n, (k,), generator=gen)].clone()
    for _ in range(iters):
        assign = torch.cat([(x[i:i + chunk] @ centroids.T).argmax(1) for i in range(0, n, chunk)])
        sums = torch.zeros(k, d).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centroids = F.normalize(sums, dim=1)
        empty = counts == 0
        if empty.any():
            noise = 0.01 * torch.randn(int(empty.sum()), d, generator=gen)
            centroids[empty] = F.normalize(x[torch.randint(n, (int(empty.sum()),), generator=gen)] + noise, dim=1)
    return centroids


@dataclass
class VQTrainReport:
    out_dir: str
    steps: int
    wall_s: float
    final_psnr_rgb: float            # mean training-crop PSNR (RGB) over the last log window
    reference_psnr_y: float          # REFERENCE_BOX of REFERENCE_IMAGE, encode-decode at its size
    codes_used: int                  # distinct codes over the last log window
    history: List[Dict[str, float]] = field(default_factory=list)

    def render(self) -> str:
        return (f"train-vq: {self.steps} steps in {self.wall_s:.0f}s; training-crop PSNR {self.final_psnr_rgb:.2f} dB "
                f"(RGB), reference crop {self.reference_psnr_y:.2f} dB (Y), {self.codes_used} codes in use; "
                f"weights in {self.out_dir}")


def _lr(cfg: VQTrainConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _psnr_rgb(out: torch.Tensor, target: torch.Tensor) -> float:
    mse = float(F.mse_loss(out.detach().clamp(-1, 1), target))
    return 10 * math.log10(4.0 / max(mse, 1e-12))  # pixels span 2


def train_vq(vq_cfg: VQConfig, cfg: VQTrainConfig, out_dir: str | Path,
             log: Callable[[str], None] = print, images: Optional[Dict[str, Image.Image]] = None) -> VQTrainReport:
    """Train `vq_cfg`'s architecture (a fresh one; its checkpoint is ignored) and save it to out_dir."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images = training_images() if images is None else images
    sampler = CropSampler(images, cfg)
    arch = replace(vq_cfg, checkpoint="", seed=cfg.seed)
    vq = VQTokenizer(arch).train()
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    total = cfg.autoencoder_steps + cfg.quantised_steps
    history: List[Dict[str, float]] = []
    window: List[float] = []
    used = torch.zeros(arch.codebook_size, dtype=torch.bool)
    start = time.time()
    log(f"train-vq: {len(images)} images ({len(sampler.sources)} scaled copies), "
        f"{sum(p.numel() for p in vq.parameters()):,} parameters, {total} steps of {cfg.batch_size} x {cfg.crop} px")
    for step in range(total):
        quantised = step >= cfg.autoencoder_steps
        if step == cfg.autoencoder_steps:
            seed_codebook(vq, sampler, cfg, log)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, total)
        x = sampler.batch(cfg.batch_size)
        z = latents(vq, x)
        extra = torch.zeros(())
        if quantised:
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            book = F.normalize(vq.codebook.weight, dim=1)
            with torch.no_grad():
                idx = (flat @ book.T).argmax(1)
            used[idx] = True
            q = book[idx]
            extra = F.mse_loss(q, flat.detach()) + cfg.commitment * F.mse_loss(flat, q.detach())
            z = (flat + (q - flat).detach()).reshape(b, h, w, d).permute(0, 3, 1, 2)
        out = vq.decoder(vq.post_quant_conv(z))
        loss = F.mse_loss(out, x) + cfg.l1_weight * F.l1_loss(out, x) + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(_psnr_rgb(out, x))
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            row = {"step": step + 1, "phase": 2 if quantised else 1, "loss": round(float(loss.detach()), 5),
                   "psnr_rgb": round(float(np.mean(window)), 3), "lr": _lr(cfg, step, total),
                   "codes_used": int(used.sum()), "elapsed_s": round(time.time() - start, 1)}
            history.append(row)
            log(f"  step {row['step']:5d} phase {row['phase']} loss {row['loss']:.4f} psnr {row['psnr_rgb']:.2f} dB "
                f"codes {row['codes_used']:5d} lr {row['lr']:.2e} {row['elapsed_s']:.0f}s")
            window, used = [], torch.zeros_like(used)
    vq.eval()
    with torch.no_grad():  # stored unit-norm, as LlamaGen stores an l2_norm codebook (lookup is unchanged)
        vq.codebook.weight.copy_(F.normalize(vq.codebook.weight, dim=1))
    report = VQTrainReport(out_dir=str(out_dir), steps=total, wall_s=time.time() - start,
                           final_psnr_rgb=history[-1]["psnr_rgb"], reference_psnr_y=reconstruction_psnr(vq, reference_crop()),
                           codes_used=history[-1]["codes_used"], history=history)
    save_trained(vq, cfg, report, sorted(images))
    return report


@torch.no_grad()
def seed_codebook(vq: VQTokenizer, sampler: CropSampler, cfg: VQTrainConfig, log: Callable[[str], None]) -> None:
    """Codebook <- spherical k-means centroids of the phase-1 encoder's latents."""
    t = time.time()
    vq.eval()
    parts = []
    for i in range(0, cfg.kmeans_crops, 64):
        z = latents(vq, sampler.batch(min(64, cfg.kmeans_crops - i)))
        parts.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    vq.train()
    x = torch.cat(parts)
    centroids = spherical_kmeans(x, vq.cfg.codebook_size, cfg.kmeans_iters, sampler.gen)
    vq.codebook.weight.copy_(centroids)
    log(f"  codebook seeded by k-means on {len(x):,} latents ({time.time() - t:.0f}s)")


def save_trained(vq: VQTokenizer, cfg: VQTrainConfig, report: VQTrainReport, sources: List[str]) -> Path:
    out = vq.save(report.out_dir)
    record = {
        "made_by": "realsr-r1 train-vq",
        "vq_train": asdict(cfg),
        "architecture": asdict(vq.cfg),
        "sources": sources,
        "reference": {"image": f"skimage.data.{REFERENCE_IMAGE}", "box": list(REFERENCE_BOX),
                      "psnr_y": round(report.reference_psnr_y, 4)},
        "result": {k: v for k, v in asdict(report).items() if k not in ("history", "out_dir")},
        "history": report.history,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    overrides = " ".join(f"vq_train.{k}={v}" for k, v in asdict(cfg).items()
                         if v != getattr(VQTrainConfig(), k))
    (out / "README.md").write_text(
        "# Trained tiny VQ tokenizer\n\n"
        f"Made by `realsr-r1 train-vq --out {out}{(' ' + overrides) if overrides else ''}` "
        f"({report.steps} steps, {report.wall_s / 60:.0f} min on {torch.get_num_threads()} CPU threads, seed {cfg.seed}).\n"
        "The architecture is the `vq` section of the config it ran with; training.json records every setting, "
        "the source images, the loss curve and the reference crop's reconstruction PSNR "
        f"({report.reference_psnr_y:.2f} dB, Y channel). Rerunning the command remakes it; thread "
        "scheduling makes the floating-point sums, so the weights are close to, not bit-equal with, these.\n")
    return out
