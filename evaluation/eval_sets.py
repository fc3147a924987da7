"""`realsr-r1 prepare-eval`: the paper's test-set layouts from folders the user has.

- Paired sets (RealSR, DRealSR, ...): LR and HR images matched by file stem, after dropping
  a trailing `_HR`, `_LR`, `_LR4`, `x4` (any case, `_` or `-`), so `Canon_001_LR4.png` pairs
  with `Canon_001_HR.png`. Each pair is centre-cropped as the comparison methods do: LR
  `lr_size` (128) and the HR region that covers it exactly (`scale` x: 512).
- Synthetic sets (OST-Val-like): HR images centre-cropped to `lr_size * scale` and degraded by
  this project's pipeline (`degradation.*`) with a fixed seed per image, so the set is the
  same on every machine. A `<stem>.json` beside each LR image records its degradation labels,
  which eval's chain-of-thought rows read.

Both write `<out>/lr/<stem>.png` and `<out>/hr/<stem>.png` (what `eval --data NAME=LR,HR`
takes), `summary.json` and `skipped.jsonl`. Nothing is dropped silently: unmatched stems,
unreadable files, images smaller than the crop and pairs whose sizes are not `scale` apart
are each counted and listed with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from evaluation.infer import require_images
from vlcot.data import sample_seed
from vlcot.degradation import degrade, label_degradation
from vlcot.errors import existing_folder
from vlcot.images import open_image

PAIR_SUFFIX = re.compile(r"[_-](hr|lr\d*|x\d+)$", re.IGNORECASE)


@dataclass
class EvalSetSummary:
    kind: str  # paired | synthetic
    out_dir: str
    pairs: int = 0
    skipped: List[Dict[str, str]] = field(default_factory=list)  # {"file", "reason"}

    def render(self) -> str:
        lines = [f"prepare-eval ({self.kind}): {self.pairs} pairs -> {self.out_dir}"]
        reasons: Dict[str, int] = {}
        for s in self.skipped:
            key = s["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)} (listed in skipped.jsonl)")
            lines += [f"    {n} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])]
        lines.append(f"  eval with: --data NAME={Path(self.out_dir) / 'lr'},{Path(self.out_dir) / 'hr'}")
        return "\n".join(lines)


def pair_key(stem: str) -> str:
    """`Canon_001_LR4` and `Canon_001_HR` -> `Canon_001`; other stems unchanged."""
    return PAIR_SUFFIX.sub("", stem)


def _images(folder: Path, flag: str) -> List[Path]:
    """The folder's image files, as eval itself lists them (`evaluation.infer.list_inputs`); a
    path that is not a folder of images is a BadPath naming it and `flag`."""
    existing_folder(folder, flag, "give a folder of images")
    return require_images(folder, flag)[0]


def _centre_box(w: int, h: int, size: int) -> Tuple[int, int, int, int]:
    left, top = (w - size) // 2, (h - size) // 2
    return left, top, left + size, top + size


def _start(out_dir: Path) -> None:
    for sub in ("lr", "hr"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def _finish(summary: EvalSetSummary) -> EvalSetSummary:
    out = Path(summary.out_dir)
    (out / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in summary.skipped))
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def paired_set(lr_dir: Path, hr_dir: Path, out_dir: Path, lr_size: int = 128, scale: int = 4) -> EvalSetSummary:
    lr_dir, hr_dir, out_dir = Path(lr_dir), Path(hr_dir), Path(out_dir)
    summary = EvalSetSummary("paired", str(out_dir))
    lr_files, hr_files = _images(lr_dir, "--paired LR_DIR"), _images(hr_dir, "--paired HR_DIR")
    hr_by_key: Dict[str, Path] = {}
    for f in hr_files:
        if pair_key(f.stem) in hr_by_key:
            summary.skipped.append({"file": str(f), "reason": f"duplicate stem: {pair_key(f.stem)!r} "
                                    f"is also {hr_by_key[pair_key(f.stem)].name}"})
            continue
        hr_by_key[pair_key(f.stem)] = f
    _start(out_dir)
    used = set()
    for f in lr_files:
        key = pair_key(f.stem)
        hr_path = hr_by_key.get(key)
        if hr_path is None:
            summary.skipped.append({"file": str(f), "reason": f"unmatched: no HR image for stem {key!r} in {hr_dir}"})
            continue
        used.add(key)
        why = _write_pair(f, hr_path, out_dir, key, lr_size, scale)
        if why:
            summary.skipped.append({"file": str(f), "reason": why})
        else:
            summary.pairs += 1
    for key, f in hr_by_key.items():
        if key not in used:
            summary.skipped.append({"file": str(f), "reason": f"unmatched: no LR image for stem {key!r} in {lr_dir}"})
    return _finish(summary)


def _write_pair(lr_path: Path, hr_path: Path, out_dir: Path, key: str, lr_size: int, scale: int) -> Optional[str]:
    lr, why, _ = open_image(lr_path)
    if lr is None:
        return f"unreadable: {why}"
    hr, why, _ = open_image(hr_path)
    if hr is None:
        return f"unreadable: {hr_path.name}: {why}"
    (lw, lh), (hw, hh) = lr.size, hr.size
    if abs(hw - scale * lw) >= scale or abs(hh - scale * lh) >= scale:
        return f"sizes not x{scale} apart: LR {lw}x{lh}, HR {hw}x{hh}"
    if min(lw, lh) < lr_size:
        return f"too small: LR {lw}x{lh} is smaller than the {lr_size}-px crop"
    box = _centre_box(lw, lh, lr_size)
    lr.crop(box).save(out_dir / "lr" / f"{key}.png")
    hr.crop(tuple(v * scale for v in box)).save(out_dir / "hr" / f"{key}.png")
    return None


def synthetic_set(hr_dir: Path, out_dir: Path, degradation, lr_size: int = 128, scale: int = 4,
                  seed: int = 0) -> EvalSetSummary:
    """OST-Val-like: HR centre crops of lr_size * scale, degraded with a fixed seed per image."""
    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    summary = EvalSetSummary("synthetic", str(out_dir))
    hr_size = lr_size * scale
    files = _images(hr_dir, "--synthetic")
    _start(out_dir)
    for f in files:
        img, why, _ = open_image(f)
        if img is None:
            summary.skipped.append({"file": str(f), "reason": f"unreadable: {why}"})
            continue
        if min(img.size) < hr_size:
            summary.skipped.append({"file": str(f), "reason": f"too small: {img.size[0]}x{img.size[1]} is smaller "
                                    f"than the {hr_size}-px crop"})
            continue
        hr = img.crop(_centre_box(*img.size, hr_size))
        lr, params = degrade(np.asarray(hr, dtype=np.uint8), (lr_size, lr_size), degradation,
                             sample_seed(seed, f.stem, 0))
        hr.save(out_dir / "hr" / f"{f.stem}.png")
        Image.fromarray(lr).save(out_dir / "lr" / f"{f.stem}.png")
        labels = label_degradation(params, degradation.thresholds)
        (out_dir / "lr" / f"{f.stem}.json").write_text(json.dumps({"labels": labels, "seed": params["seed"]}))
        summary.pairs += 1
    return _finish(summary)
