"""LlamaGen-style VQ image tokenizer built from diffusers building blocks.

Architecture of LlamaGen `VQ_8` (the `vq_ds8_c2i.pt` checkpoint): a taming-style
encoder/decoder (resnet blocks, attention at the lowest resolution, x8 down/upsampling),
1x1 quant convs and a codebook of 16,384 8-d codes looked up by L2-normalised nearest
neighbour. diffusers' `Encoder`/`Decoder` have the same computation graph;
`llamagen_to_diffusers` renames LlamaGen's keys (and squeezes its 1x1-conv attention
projections into linear weights). Pixels are in [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from PIL import Image
from safetensors.torch import load_file, save_file

from vlcot.config import VQ_FILES, VQCheckpointError, VQConfig, resolve_checkpoint
from vlcot.images import to_rgb

CONFIG_NAME, WEIGHTS_NAME = VQ_FILES


class VQTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.block_out_channels)
        self.downsample = 2 ** (levels - 1)
        chans = tuple(cfg.block_out_channels)
        with torch.random.fork_rng():  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(
                in_channels=3, out_channels=cfg.z_channels,
                down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
                block_out_channels=chans, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, double_z=False,
            )
            self.decoder = Decoder(
                in_channels=cfg.z_channels, out_channels=3,
                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (levels - 1),
                block_out_channels=chans, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups,
            )
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
            self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
            with torch.no_grad():
                self.codebook.weight.copy_(F.normalize(torch.randn(self.codebook.weight.shape), dim=-1))
        self.eval()

    # ---- codes <-> latents ----------------------------------------------------------------
    def _normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, p=2, dim=-1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> [B, H/8, W/8] int64 codes."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] pixels, got {tuple(pixels.shape)}")
        if pixels.shape[-1] % self.downsample or pixels.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of {self.downsample}")
        return self.quantize(self.quant_conv(self.encoder(pixels.to(self.codebook.weight.dtype))))

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """[B, d, h, w] latents -> [B, h, w] codes: nearest L2-normalised codebook entry to
        the L2-normalised latent (for unit vectors, nearest == largest dot product)."""
        z = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)
        return torch.einsum("bhwd,nd->bhwn", z, self._normalised_codebook()).argmax(-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] codes -> [B, 3, 8h, 8w] pixels clamped to [-1, 1]."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() == 2:
            codes = codes[None]
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(f"codes outside [0, {self.cfg.codebook_size})")
        q = self._normalised_codebook()[codes].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q)).clamp(-1, 1)

    # ---- PIL convenience ------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image], size: int, batch_size: int = 8) -> np.ndarray:
        """PIL images (any mode; alpha composited on white) -> [N, size/8, size/8] codes,
        each image bicubic-resized to size x size."""
        out: List[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([pil_to_tensor(to_rgb(im).resize((size, size), Image.BICUBIC)) for im in images[i:i + batch_size]])
            out.append(self.encode(batch).numpy())
        return np.concatenate(out) if out else np.zeros((0, size // 8, size // 8), dtype=np.int64)

    def decode_images(self, codes: np.ndarray | torch.Tensor) -> List[Image.Image]:
        return [tensor_to_pil(x) for x in self.decode(torch.as_tensor(np.asarray(codes)))]

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))
        return path

    @classmethod
    def load(cls, path: str | Path, cfg: VQConfig | None = None) -> "VQTokenizer":
        """A directory written by `save`, or a LlamaGen `.pt` checkpoint (with `cfg` giving
        its architecture, default VQ_8). A missing, unreadable or mismatched file is a
        FileNotFoundError / ValueError naming it."""
        path = Path(path)
        if path.is_dir():
            config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
            for f in (config_file, weights_file):
                if not f.is_file():
                    raise FileNotFoundError(f"{path} has no {f.name}")
            try:
                saved = VQConfig(**json.loads(config_file.read_text()))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{config_file} is not a VQ configuration: {exc}") from None
            model = cls(saved)
            try:
                state = load_file(str(weights_file))
            except Exception as exc:  # safetensors raises its own error types for a damaged file
                raise ValueError(f"{weights_file} is not a readable safetensors file: {exc}") from None
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{weights_file} does not hold the weights {config_file.name} describes: "
                                 f"{str(exc).splitlines()[0]}") from None
            return model.eval()
        if not path.is_file():
            raise FileNotFoundError(f"VQ checkpoint not found: {path}")
        cfg = cfg or VQConfig()
        model = cls(cfg)
        model.load_state_dict(llamagen_to_diffusers(read_llamagen_weights(path, cfg.weights)), strict=True)
        return model.eval()


# What a LlamaGen `vq_train.py` checkpoint pickles besides tensors: its argparse Namespace
# (`args`). torch.load(weights_only=True) refuses any other global, so a user's file never
# runs code; weights_only=False is never used.
SAFE_GLOBALS = [argparse.Namespace]
WEIGHT_ENTRIES = ("model", "ema")


def read_llamagen_weights(path: str | Path, which: str = "model") -> Dict[str, torch.Tensor]:
    """The VQ state dict inside a LlamaGen checkpoint: the `which` entry (model | ema) of a
    training checkpoint ({model, optimizer, steps, args[, ema]}), or the file itself when it
    is a bare state dict."""
    if which not in WEIGHT_ENTRIES:
        raise ValueError(f"vq.weights {which!r} not in {list(WEIGHT_ENTRIES)}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"VQ checkpoint {path} holds objects other than tensors and a training Namespace; it is "
                         f"not loaded (weights_only): {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"VQ checkpoint {path} is not a dict of weights")
    if any(k in ckpt for k in WEIGHT_ENTRIES + ("state_dict",)):
        if isinstance(ckpt.get(which), dict):
            return ckpt[which]
        if which == "model" and isinstance(ckpt.get("state_dict"), dict):
            return ckpt["state_dict"]
        have = [k for k in WEIGHT_ENTRIES + ("state_dict",) if isinstance(ckpt.get(k), dict)]
        raise ValueError(f"VQ checkpoint {path} has no {which!r} weights (vq.weights); it holds {have}")
    return ckpt


def vq_from_config(cfg: VQConfig) -> VQTokenizer:
    """The configured tokenizer: `vq.checkpoint` loaded, or a random one built from `vq.*`
    when it is empty. A bad checkpoint is a VQCheckpointError naming the file and the config key."""
    if not cfg.checkpoint:
        return VQTokenizer(cfg)
    try:
        vq = VQTokenizer.load(resolve_checkpoint(cfg.checkpoint), cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: a .pt torch cannot read or map
        raise VQCheckpointError(f"vq.checkpoint={cfg.checkpoint}: {str(exc).splitlines()[0]}") from None
    if vq.cfg.codebook_size != cfg.codebook_size or vq.cfg.codebook_dim != cfg.codebook_dim:
        raise VQCheckpointError(f"vq.checkpoint={cfg.checkpoint} has a {vq.cfg.codebook_size} x {vq.cfg.codebook_dim} "
                         f"codebook; vq.codebook_size / codebook_dim say {cfg.codebook_size} x {cfg.codebook_dim}")
    return vq


# ---- LlamaGen key mapping ------------------------------------------------------------------
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RULES = [
    (r"^(encoder|decoder)\.mid\.0\.(.*)$", r"\1.mid_block.resnets.0.\2"),
    (r"^(encoder|decoder)\.mid\.1\.(.*)$", r"\1.mid_block.attentions.0.\2"),
    (r"^(encoder|decoder)\.mid\.2\.(.*)$", r"\1.mid_block.resnets.1.\2"),
    (r"^encoder\.conv_blocks\.(\d+)\.res\.(.*)$", r"encoder.down_blocks.\1.resnets.\2"),
    (r"^encoder\.conv_blocks\.(\d+)\.attn\.(.*)$", r"encoder.down_blocks.\1.attentions.\2"),
    (r"^encoder\.conv_blocks\.(\d+)\.downsample\.(.*)$", r"encoder.down_blocks.\1.downsamplers.0.\2"),
    (r"^decoder\.conv_blocks\.(\d+)\.res\.(.*)$", r"decoder.up_blocks.\1.resnets.\2"),
    (r"^decoder\.conv_blocks\.(\d+)\.attn\.(.*)$", r"decoder.up_blocks.\1.attentions.\2"),
    (r"^decoder\.conv_blocks\.(\d+)\.upsample\.(.*)$", r"decoder.up_blocks.\1.upsamplers.0.\2"),
    (r"^(encoder|decoder)\.norm_out\.(.*)$", r"\1.conv_norm_out.\2"),
    (r"^quantize\.embedding\.weight$", "codebook.weight"),
]


def llamagen_to_diffusers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a LlamaGen VQModel state dict to this module's keys.

    Drops the training-only `quantize.codebook_used` buffer; 1x1-conv attention projections
    [c, c, 1, 1] become linear weights [c, c]; `nin_shortcut` becomes `conv_shortcut`.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("quantize.codebook_used"):
            continue
        new = key
        for pattern, repl in _RULES:
            new = re.sub(pattern, repl, new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        m = re.match(r"^(.*\.attentions\.\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.{_ATTN[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and value.dim() == 4:
                value = value[:, :, 0, 0]
        out[new] = value
    return out


# ---- pixels ----------------------------------------------------------------------------------
def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    arr = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")
