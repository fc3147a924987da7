"""Data preparation: HQ images (+ optional captions and tags) -> HR crops, degraded LR
images, degradation labels and a JSONL manifest.

The manifest's record and its reading and writing live in vlcot/manifest.py.

Captions and tags for a folder come from a sidecar `<stem>.json` next to each image:
`{"captions": {"x4": ..., "x2": ..., "x1": ...}, "tags": [...]}`. Bad files are skipped
with a reason (listed in `skipped.jsonl` and the summary); odd modes are converted and
the conversion is noted. One bad file never stops the run.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlcot.config import DataConfig, DegradationConfig, ImageConfig
from vlcot.degradation import degrade, label_degradation, usm_sharpen
from vlcot.errors import BadPath, UserError, existing_folder, output_folder
from vlcot.examples import FALLBACK_CAPTION
from vlcot.images import IMAGE_SUFFIXES, open_image, to_rgb
from vlcot.manifest import (Captions, DegradationRecord, ManifestRecord, heldout_manifest_path, write_jsonl,
                            write_manifest)
from vlcot.text_tokenizer import ANNOTATIONS
from vlcot.trace import degradation_text

log = logging.getLogger(__name__)
SIDECAR_SUFFIXES = {".json"}


@dataclass
class Candidate:
    id: str
    source: str
    path: Optional[Path] = None  # file on disk, or None for an in-memory built-in image
    image: Optional[Image.Image] = None
    annotation: Optional[Dict[str, Any]] = None
    annotation_error: str = ""


@dataclass
class Summary:
    seen: int = 0
    images_ok: int = 0
    samples: int = 0
    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    annotation_problems: Counter = field(default_factory=Counter)
    missing_captions: int = 0  # usable images without captions (SFT writes the fallback caption)
    missing_tags: int = 0  # usable images without tags (their understanding reward is 0)
    labels: List[Counter] = field(default_factory=lambda: [Counter() for _ in range(5)])  # of the manifest's samples
    manifest: str = ""
    heldout_samples: int = 0
    heldout_manifest: str = ""
    heldout_missing: int = 0  # held-out crops not made: the image had no box training does not use

    def to_dict(self) -> Dict[str, Any]:
        return {
            "seen": self.seen,
            "images_ok": self.images_ok,
            "samples": self.samples,
            "converted": dict(self.converted),
            "skipped": dict(self.skipped),
            "annotation_problems": dict(self.annotation_problems),
            "missing_captions": self.missing_captions,
            "missing_tags": self.missing_tags,
            "labels": [dict(c) for c in self.labels],
            "manifest": self.manifest,
            "heldout_samples": self.heldout_samples,
            "heldout_manifest": self.heldout_manifest,
            "heldout_missing": self.heldout_missing,
        }

    def render(self) -> str:
        lines = [
            f"prepare-data: {self.seen} files seen, {self.images_ok} usable -> {self.samples} samples",
            f"  manifest: {self.manifest}",
        ]
        if self.heldout_manifest:
            lines.append(f"  held-out: {self.heldout_samples} samples in {self.heldout_manifest}"
                         + (f" (WARNING: {self.heldout_missing} crops not made: images too small for a crop "
                            "training does not use)" if self.heldout_missing else ""))
        for title, counter in (("converted", self.converted), ("skipped", self.skipped),
                               ("annotation problems", self.annotation_problems)):
            if counter:
                lines.append(f"  {title}: {sum(counter.values())}")
                lines += [f"    {n} x {reason}" for reason, n in counter.most_common()]
        lines += [f"  WARNING: {w}" for w in self.annotation_warnings()]
        slots = ("blur", "resize", "noise", "compression", "final resize")
        for slot, c in zip(slots, self.labels):
            if c:
                lines.append(f"  labels/{slot}: " + ", ".join(f"{w} {n}" for w, n in sorted(c.items())))
        return "\n".join(lines)

    def annotation_warnings(self) -> List[str]:
        out = []
        if self.missing_captions:
            out.append(f"{self.missing_captions} of {self.images_ok} images have no captions: cold-start SFT "
                       f"writes {FALLBACK_CAPTION!r} for each of their three understanding texts")
        if self.missing_tags:
            out.append(f"{self.missing_tags} of {self.images_ok} images have no tags: their understanding reward "
                       "is 0 for every sample")
        if out:
            out.append("add a <stem>.json sidecar beside each image (docs/vlcot.md), or set "
                       "data.require_annotations=true to stop before any work, naming each image that lacks one")
        return out


def missing_annotation(annotation: Optional[Dict[str, Any]]) -> List[str]:
    """What an image's annotation lacks: "captions" and/or "tags"."""
    ann = annotation or {}
    caps = ann.get("captions") or {}
    out = []
    if not all(isinstance(caps.get(k), str) and caps[k].strip() for k in ("x4", "x2", "x1")):
        out.append("captions")
    if not ann.get("tags"):
        out.append("tags")
    return out


# ---- sources ------------------------------------------------------------------------------
def _builtin_loaders():
    import skimage.data as skd

    def sk(name):
        def load():
            arr = getattr(skd, name)()
            return Image.fromarray(arr[0] if isinstance(arr, tuple) else arr)
        return load

    def sklearn_image(fname):
        def load():
            from sklearn.datasets import load_sample_image
            return Image.fromarray(load_sample_image(fname))
        return load

    def grace_hopper():
        import matplotlib.cbook as cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")

    loaders = {n: sk(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                                   "immunohistochemistry", "retina", "stereo_motorcycle")}
    loaders["china"] = sklearn_image("china.jpg")
    loaders["flower"] = sklearn_image("flower.jpg")
    loaders["grace_hopper"] = grace_hopper
    return loaders


def builtin_candidates() -> Iterator[Candidate]:
    """The built-in sample set: natural photographs shipped inside scikit-image (and, when
    installed, scikit-learn and matplotlib), with hand-written captions and tags."""
    annotations = json.loads(ANNOTATIONS.read_text())
    for name, load in _builtin_loaders().items():
        ann = annotations[name]
        cand = Candidate(id=name, source=ann["source"], annotation={"captions": ann["captions"], "tags": ann["tags"]})
        try:
            cand.image = load()
        except Exception as exc:  # an optional package missing or its data absent
            cand.annotation_error = f"could not load built-in image: {type(exc).__name__}: {exc}"
        yield cand


def folder_candidates(folder: Path) -> Iterator[Candidate]:
    """Every file in `folder` (sorted, recursive) except annotation sidecars."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in SIDECAR_SUFFIXES)
    for path in files:
        cand = Candidate(id=str(path.relative_to(folder).with_suffix("")).replace(os.sep, "__"), source=str(path), path=path)
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                cand.annotation = _validate_annotation(json.loads(sidecar.read_text()))
            except (ValueError, OSError) as exc:
                cand.annotation_error = f"bad sidecar {sidecar.name}: {exc}"
        yield cand


def _validate_annotation(obj: Any) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    captions = obj.get("captions")
    if captions is not None:
        if not isinstance(captions, dict) or not all(isinstance(captions.get(k), str) for k in ("x4", "x2", "x1")):
            raise ValueError("captions must map x4, x2 and x1 to strings")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("tags must be a list of strings")
    return {"captions": captions, "tags": tags}


# ---- processing ---------------------------------------------------------------------------
def center_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square on the short side and resize to size x size (Lanczos)."""
    return square_crop(image, center_box(*image.size), size)


Box = Tuple[int, int, int]  # left, top, side of a square crop


def center_box(width: int, height: int) -> Box:
    s = min(width, height)
    return (width - s) // 2, (height - s) // 2, s


def square_crop(image: Image.Image, box: Box, size: int) -> Image.Image:
    left, top, side = box
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


@dataclass(frozen=True)
class View:
    """One HR made from an image: its id, the square it crops, and the split it feeds."""

    id: str
    box: Box
    heldout: bool = False


def image_views(image_id: str, width: int, height: int, data: DataConfig, hr_size: int) -> List[View]:
    """The HRs prepare-data makes from one image: its centre square (`data.crops_per_image` 0)
    or that many random squares, plus `data.heldout_per_image` random squares for the held-out
    set, each a box no training view has. Seeded by the image id, so a rerun makes the same."""
    short = min(width, height)
    smallest = min(short, max(hr_size, int(round(data.crop_min_scale * short))))
    rng = np.random.default_rng(sample_seed(data.seed, image_id, -1))

    def random_box() -> Box:
        side = int(rng.integers(smallest, short + 1))
        return int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side

    if data.crops_per_image == 0:
        views = [View(image_id, center_box(width, height))]
    else:
        views = [View(f"{image_id}_c{k}", random_box()) for k in range(data.crops_per_image)]
    taken = {v.box for v in views}
    for k in range(data.heldout_per_image):
        for _ in range(1000):  # a small image has few distinct boxes: a repeat is drawn again
            box = random_box()
            if box not in taken:
                taken.add(box)
                views.append(View(f"{image_id}_h{k}", box, heldout=True))
                break
    return views  # fewer held-out views than asked when the image has no other box (the caller counts them)


def sample_seed(base: int, image_id: str, variant: int) -> int:
    return (zlib.crc32(f"{image_id}#{variant}".encode()) ^ (base * 2654435761)) % (2**31)


def _load(cand: Candidate, data: DataConfig) -> Tuple[Optional[Image.Image], str, str]:
    if cand.image is not None:
        note = "" if cand.image.mode == "RGB" else f"converted from {cand.image.mode}"
        return to_rgb(cand.image), "", note
    if cand.path is None:
        return None, cand.annotation_error or "no image", ""
    if cand.path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image file type ({cand.path.suffix or 'no extension'})", ""
    return open_image(cand.path, data.max_pixels)


def prepare(candidates, out_dir: Path, image: ImageConfig, degradation: DegradationConfig, data: DataConfig,
            progress: bool = True) -> Summary:
    out_dir = Path(out_dir)
    (out_dir / "hr").mkdir(parents=True, exist_ok=True)
    (out_dir / "lr").mkdir(parents=True, exist_ok=True)
    manifest = Path(data.manifest) if data.manifest else out_dir / "manifest.jsonl"
    summary = Summary(manifest=str(manifest),
                      heldout_manifest=str(heldout_manifest_path(data)) if data.heldout_per_image else "")
    lr_hw = (image.lr_size, image.lr_size)
    records: List[ManifestRecord] = []
    heldout: List[ManifestRecord] = []
    skipped: List[Dict[str, str]] = []
    cands = list(candidates)
    if data.require_annotations:
        _require_annotations(cands)
    for cand in tqdm(cands, desc="prepare-data", unit="img", disable=not progress):
        summary.seen += 1
        img, why, note = _load(cand, data)
        if img is not None and min(img.size) < data.min_side:
            img, why = None, f"too small: {img.size[0]}x{img.size[1]} < min_side {data.min_side}"
        if img is None:
            summary.skipped[_reason_key(why)] += 1
            skipped.append({"id": cand.id, "source": cand.source, "reason": why})
            log.warning("skipped %s: %s", cand.source, why)
            continue
        notes = [note] if note else []
        if note:
            summary.converted[note] += 1
        if cand.annotation_error:
            summary.annotation_problems[cand.annotation_error.split(":")[0]] += 1
            notes.append(cand.annotation_error)
        summary.images_ok += 1
        ann = cand.annotation or {}
        caps = ann.get("captions")
        captions = Captions(caps["x4"], caps["x2"], caps["x1"]) if caps else None
        lacks = missing_annotation(ann)
        summary.missing_captions += "captions" in lacks
        summary.missing_tags += "tags" in lacks
        views = image_views(cand.id, *img.size, data, image.hr_size)
        short = data.heldout_per_image - sum(v.heldout for v in views)
        if short:
            summary.heldout_missing += short
            log.warning("%s: %dx%d has no crop left that training does not use: %d of its %d held-out crops are "
                        "not made", cand.source, *img.size, short, data.heldout_per_image)
        for view in views:
            hr = square_crop(img, view.box, image.hr_size)
            hr_rel = Path("hr") / f"{view.id}.png"
            hr_arr = np.asarray(hr, dtype=np.uint8)  # the LR is degraded from this, sharpened or not
            (Image.fromarray(usm_sharpen(hr_arr)) if data.usm_hr else hr).save(out_dir / hr_rel)
            for v in range(1 if view.heldout else data.variants_per_image):  # one LR per held-out crop
                seed = sample_seed(data.seed, view.id, v)
                lr, params = degrade(hr_arr, lr_hw, degradation, seed)
                labels = label_degradation(params, degradation.thresholds)
                lr_rel = Path("lr") / f"{view.id}_v{v}.png"
                Image.fromarray(lr).save(out_dir / lr_rel)
                (heldout if view.heldout else records).append(ManifestRecord(
                    id=f"{view.id}_v{v}", source=cand.source, hr_path=hr_rel.as_posix(), lr_path=lr_rel.as_posix(),
                    hr_size=image.hr_size, lr_size=image.lr_size, seed=seed,
                    degradation=DegradationRecord(labels, degradation_text(labels), params),
                    captions=captions, tags=list(ann.get("tags", [])), notes=notes, hr_usm=data.usm_hr, crop=view.box))
                if view.heldout:
                    summary.heldout_samples += 1
                    continue
                for i, w in enumerate(labels):
                    summary.labels[i][w] += 1
                summary.samples += 1
    for warning in summary.annotation_warnings():
        log.warning("prepare-data: %s", warning)
    write_manifest(manifest, records)
    if data.heldout_per_image:
        write_manifest(Path(summary.heldout_manifest), heldout)
    write_jsonl(out_dir / "skipped.jsonl", skipped)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def _require_annotations(cands: List[Candidate]) -> None:
    """`data.require_annotations`: stop before any work, naming the images that lack captions
    or tags (or whose sidecar is unreadable)."""
    bad = []
    for cand in cands:
        lacks = missing_annotation(cand.annotation)
        if cand.annotation_error or lacks:
            bad.append(f"{cand.source}: {cand.annotation_error or 'no ' + ' and no '.join(lacks)}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"data.require_annotations is set and {len(bad)} of {len(cands)} images lack captions or "
                        f"tags: {shown}. Write a <stem>.json sidecar beside each (docs/vlcot.md; `realsr-r1 annotate "
                        "--input DIR` writes them), or set data.require_annotations=false")


def _reason_key(reason: str) -> str:
    """Group reasons for the summary: 'too small: 1x1 < ...' -> 'too small'."""
    return reason.split(":")[0].strip() or "unknown"


def refuse_imageless(folder: Path) -> None:
    """An input folder with no file of an image type (recursively; sidecars aside) is a
    mistake to name now, not a run that ends with 0 samples."""
    files = []
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            return
        if p.is_file() and p.suffix.lower() not in SIDECAR_SUFFIXES:
            files.append(p)
    found = f"{len(files)} other files, e.g. {files[0].name}" if files else "it is empty"
    kinds = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    raise BadPath(f"data.input_dir (--input) {folder} holds no image files ({found}): give a folder of photographs "
                  f"({kinds}), or leave it empty for the built-in set")


def prepare_data(image: ImageConfig, degradation: DegradationConfig, data: DataConfig, progress: bool = True) -> Summary:
    """`realsr-r1 prepare-data`: the built-in set when `data.input_dir` is empty, else that folder."""
    output_folder(data.output_dir, "data.output_dir (--out)")
    if data.input_dir:
        folder = existing_folder(data.input_dir, "data.input_dir (--input)", "give a folder of photographs")
        refuse_imageless(folder)
        candidates = folder_candidates(folder)
    else:
        candidates = builtin_candidates()
    return prepare(candidates, Path(data.output_dir), image, degradation, data, progress=progress)
