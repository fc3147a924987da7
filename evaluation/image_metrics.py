"""The image metrics of the paper's Table 1, and which of them can run here.

PSNR and SSIM (Y channel) are computed by `vlcot.fidelity`; the rest come from pyiqa
(so this module runs in the IQA environment), each labelled with its exact pyiqa metric
(the training set of a learned metric changes its numbers: the paper reports maniqa-pipal
and topiq_nr-spaq). Learned metrics need local weight files under
`eval.weights_dir` (names below, relative to it; `torch/` and `hf/` hold the torchvision and
timm/HF-hub backbone caches). A metric whose files are missing, or whose construction fails
offline, is reported as unavailable with the reason: never a crash, never a zero.
NIQE uses MATLAB's pristine model `niqe_modelparameters.mat` when it is in weights_dir;
otherwise the pristine statistics this project fits on its built-in photographs, and the
row is labelled "NIQE*" (not comparable with published NIQE numbers).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rewards.iqa import to_unit_tensor, upsample_short_side
from rewards.niqe import BUILTIN_PRISTINE
from vlcot.fidelity import psnr_y, ssim_y
from vlcot.images import open_image

log = logging.getLogger(__name__)


FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pyiqa's FID Inception, under weights_dir


@dataclass(frozen=True)
class EvalMetric:
    name: str
    label: str
    higher_better: bool
    full_reference: bool
    pyiqa_name: str = ""  # "" = computed by vlcot.fidelity
    files: Tuple[str, ...] = ()  # under weights_dir; the first is pyiqa's pretrained_model_path
    options: Tuple[Tuple[str, object], ...] = ()
    min_size: int = 0  # short side below this is bicubic-upsampled first
    set_level: bool = False  # one value per (set, column) from all its images (FID), not a per-image mean

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_better else "↓"


METRICS: Dict[str, EvalMetric] = {m.name: m for m in (
    EvalMetric("psnr", "PSNR", True, True),
    EvalMetric("ssim", "SSIM", True, True),
    EvalMetric("lpips", "LPIPS", False, True, "lpips", ("lpips.pth", "torch/hub/checkpoints/alexnet-owt-7be5be79.pth")),
    EvalMetric("dists", "DISTS", False, True, "dists", ("dists.pth", "torch/hub/checkpoints/vgg16-397923af.pth")),
    EvalMetric("niqe", "NIQE", False, False, "niqe", ("niqe_modelparameters.mat",), min_size=192),
    EvalMetric("musiq", "MUSIQ [musiq: KonIQ]", True, False, "musiq", ("musiq.pth",)),
    EvalMetric("maniqa", "MANIQA [maniqa: KonIQ]", True, False, "maniqa", ("maniqa.pth",)),
    EvalMetric("maniqa_pipal", "MANIQA [maniqa-pipal]", True, False, "maniqa-pipal", ("maniqa_pipal.pth",)),
    EvalMetric("clipiqa", "CLIPIQA [clipiqa]", True, False, "clipiqa", ("clipiqa.pth", "clip/RN50.pt")),
    EvalMetric("topiq_nr", "TOPIQ [topiq_nr: KonIQ]", True, False, "topiq_nr", ("topiq_nr.pth",),
               (("backbone_pretrain", False),)),
    EvalMetric("topiq_nr_spaq", "TOPIQ [topiq_nr-spaq]", True, False, "topiq_nr-spaq", ("topiq_nr_spaq.pth",),
               (("backbone_pretrain", False),)),
    # the set's SR outputs against its HR images (clean-fid resizing, the FID Inception weights)
    EvalMetric("fid", "FID [fid: clean]", False, True, "fid", (FID_WEIGHTS,), set_level=True),
)}
# The paper's Table 1 uses maniqa-pipal and topiq_nr-spaq; the KonIQ-trained defaults of pyiqa
# (maniqa, topiq_nr, musiq) give different numbers. Each row's label names its pyiqa metric.


@dataclass
class MetricStatus:
    name: str
    label: str
    available: bool
    reason: str = ""  # why unavailable, or a note on how it was computed


@contextlib.contextmanager
def _offline_caches(weights_dir: str):
    """Point torchvision / HF hub caches into weights_dir and forbid hub downloads."""
    keys = ("TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_HOME"] = str(Path(weights_dir) / "torch")
    os.environ["HF_HOME"] = str(Path(weights_dir) / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _fid_weights(path: Path):
    """pyiqa builds its FID Inception from a URL constant (downloading into its cache); point it
    at the local file for the duration of the build."""
    import pyiqa.archs.inception as inception

    old = inception.FID_WEIGHTS_URL
    inception.FID_WEIGHTS_URL = str(path)
    try:
        yield
    finally:
        inception.FID_WEIGHTS_URL = old


class MetricSuite:
    """Builds the requested metrics once; scores (SR, HR-or-None) image pairs."""

    def __init__(self, names: Sequence[str], weights_dir: str = "", crop_border: int = 0, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.crop_border = crop_border
        self.specs = [METRICS[n] for n in names]
        self.status: Dict[str, MetricStatus] = {}
        self.nets: Dict[str, object] = {}
        for spec in self.specs:
            self.status[spec.name] = self._build(spec, weights_dir)

    def _build(self, spec: EvalMetric, weights_dir: str) -> MetricStatus:
        if not spec.pyiqa_name:
            return MetricStatus(spec.name, spec.label, True)
        import pyiqa

        kwargs = dict(spec.options)
        label, note = spec.label, ""
        if spec.name == "niqe" and not (weights_dir and (Path(weights_dir) / spec.files[0]).is_file()):
            kwargs["pretrained_model_path"] = str(BUILTIN_PRISTINE)
            label, note = "NIQE*", f"pristine model fitted on the built-in photographs ({BUILTIN_PRISTINE.name})"
        else:
            if not weights_dir:
                return MetricStatus(spec.name, label, False, "eval.weights_dir is not set")
            missing = [f for f in spec.files if not (Path(weights_dir) / f).is_file()]
            if missing:
                return MetricStatus(spec.name, label, False, f"missing {Path(weights_dir) / missing[0]}")
            kwargs["pretrained_model_path"] = str(Path(weights_dir) / spec.files[0])
        try:
            with _offline_caches(weights_dir or "/nonexistent"):
                if spec.set_level:
                    with _fid_weights(Path(kwargs.pop("pretrained_model_path"))):
                        self.nets[spec.name] = pyiqa.create_metric(spec.pyiqa_name, device=self.device, as_loss=False)
                else:
                    self.nets[spec.name] = pyiqa.create_metric(spec.pyiqa_name, device=self.device, as_loss=False,
                                                               **kwargs)
        except Exception as exc:  # offline construction failed: report, do not crash
            return MetricStatus(spec.name, label, False, f"could not be built offline: {type(exc).__name__}: {exc}"[:300])
        return MetricStatus(spec.name, label, True, note)

    def _tensor(self, img: np.ndarray, min_size: int = 0):
        return upsample_short_side(to_unit_tensor([img]), min_size).to(self.device)

    def score(self, sr: np.ndarray, hr: Optional[np.ndarray]) -> Dict[str, Optional[float]]:
        """uint8 [H, W, 3] SR (and HR, same size) -> {metric: value}; None where the metric is
        unavailable, needs an HR it did not get, or failed on this image (logged)."""
        import torch

        out: Dict[str, Optional[float]] = {}
        for spec in self.specs:
            out[spec.name] = None
            if spec.set_level or not self.status[spec.name].available or (spec.full_reference and hr is None):
                continue
            try:
                if spec.name == "psnr":
                    v = psnr_y(sr, hr, self.crop_border)
                elif spec.name == "ssim":
                    v = ssim_y(sr, hr, self.crop_border)
                else:
                    with torch.no_grad():
                        net = self.nets[spec.name]
                        args = [self._tensor(sr, spec.min_size)]
                        if spec.full_reference:
                            args.append(self._tensor(hr, spec.min_size))
                        v = float(torch.as_tensor(net(*args)).reshape(-1)[0])
                out[spec.name] = v if (math.isfinite(v) or spec.name == "psnr") else None
            except Exception as exc:
                log.warning("metric %s failed on an image: %s", spec.name, exc)
        return out


    def score_set(self, sr_paths: Sequence[str], hr_paths: Sequence[str]) -> Dict[str, Optional[float]]:
        """Set-level metrics (FID) of one column on one set: its SR outputs against the set's HR
        images; None where unavailable or with fewer than 2 images on either side (logged)."""
        import shutil
        import tempfile

        out: Dict[str, Optional[float]] = {}
        for spec in self.specs:
            if not spec.set_level:
                continue
            out[spec.name] = None
            if not self.status[spec.name].available:
                continue
            if min(len(sr_paths), len(hr_paths)) < 2:
                log.warning("%s needs at least 2 images per side, got %d SR and %d HR", spec.name, len(sr_paths),
                            len(hr_paths))
                continue
            tmp = Path(tempfile.mkdtemp(prefix="realsr-fid-"))
            try:  # pyiqa's FID reads folders: link the files in (a column's outputs share a folder with others)
                for side, paths in (("sr", sr_paths), ("hr", hr_paths)):
                    (tmp / side).mkdir()
                    for i, p in enumerate(paths):
                        (tmp / side / f"{i:06d}{Path(p).suffix.lower()}").symlink_to(Path(p).resolve())
                v = float(self.nets[spec.name](str(tmp / "sr"), str(tmp / "hr"), num_workers=0, verbose=False))
                out[spec.name] = v if math.isfinite(v) else None
            except Exception as exc:
                log.warning("metric %s failed on a set: %s", spec.name, exc)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out


@dataclass
class MetricShard:
    """The result of scoring a list of pairs: per-image values plus the metric status."""

    values: List[Dict[str, Optional[float]]] = field(default_factory=list)
    status: Dict[str, MetricStatus] = field(default_factory=dict)
    resized: int = 0  # SR images resized to their HR's size first
    unreadable: List[Tuple[str, str]] = field(default_factory=list)


def score_pairs(suite: MetricSuite, pairs: Sequence[Tuple[str, Optional[str]]]) -> MetricShard:
    """[(sr_path, hr_path or None)] -> MetricShard (an unreadable file yields all-None values)."""
    from PIL import Image

    shard = MetricShard(status=suite.status)
    for sr_path, hr_path in pairs:
        sr_img, why, _ = open_image(sr_path)
        hr_img = None
        if hr_path:
            hr_img, why_hr, _ = open_image(hr_path)
            if hr_img is None:
                shard.unreadable.append((hr_path, why_hr))
        if sr_img is None:
            shard.unreadable.append((sr_path, why))
            shard.values.append({s.name: None for s in suite.specs})
            continue
        if hr_img is not None and hr_img.size != sr_img.size:
            sr_img = sr_img.resize(hr_img.size, Image.BICUBIC)
            shard.resized += 1
        shard.values.append(suite.score(np.asarray(sr_img), None if hr_img is None else np.asarray(hr_img)))
    return shard
