"""`realsr-r1 annotate --input DIR`: captions and object tags for a folder of photographs,
written as the `<stem>.json` sidecars `prepare-data` reads.

- Captions: a local image-text-to-text model (`annotate.captioner`: BLIP, LLaVA, Qwen2-VL,
  ... through transformers) describes the HR crop prepare-data will make, at HR/4, HR/2 and
  HR (`x4`, `x2`, `x1`: the paper captions GT/4, GT/2 and GT), each level with its own prompt.
- Tags: a local zero-shot detector (`annotate.detector`: OWLv2 or OWL-ViT) looks for the
  words of `annotate.vocabulary` in the LR image, the very one prepare-data will make (same
  degradation seed), as the paper tags the LR image; the words scoring at least
  `annotate.score_threshold` become tags, best first. Without a detector the tags are the
  nouns of the x4 caption (a stop-word filter: there is no tagger here).
- Resumable: an image whose sidecar exists is kept unless `--overwrite`; each sidecar is
  written (atomically) as soon as its image is done, so an interrupted run continues where
  it stopped. An unreadable image is counted and listed, never fatal. A model folder that is
  missing or of the wrong kind is one error naming the folder and the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from vlcot.config import AnnotateConfig, DataConfig, DegradationConfig, ImageConfig
from vlcot.data import center_square, folder_candidates, refuse_imageless, sample_seed
from vlcot.degradation import degrade
from vlcot.errors import BadPath, UserError, existing_folder, one_line
from vlcot.images import IMAGE_SUFFIXES, open_image

log = logging.getLogger(__name__)
LEVELS = {"x4": 4, "x2": 2, "x1": 1}
DETECTORS = ("owlv2", "owlvit")
STOP_WORDS = set("""
a an the this that these those there here it its is are was were be been being has have had of in on at to from
by for with without and or but as into onto over under near next above below behind front back top bottom left
right some many few several two three one very small large big little old new image photo photograph picture
view close closeup shot scene showing shows shown which who what where while their his her they them he she we
you i my our your out up down off only also other another each more most such than then can could would should
""".split())


@dataclass
class AnnotateSummary:
    seen: int = 0
    written: int = 0
    kept: int = 0  # sidecars already there (not redone without --overwrite)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason)
    empty_captions: int = 0  # captions the model left empty (prepare-data counts them as missing)
    tags_from: Counter = field(default_factory=Counter)  # detector | caption nouns

    def render(self) -> str:
        lines = [f"annotate: {self.seen} images, {self.written} sidecars written, {self.kept} kept"]
        if self.tags_from:
            lines.append("  tags from: " + ", ".join(f"{k} {n}" for k, n in sorted(self.tags_from.items())))
        if self.empty_captions:
            lines.append(f"  WARNING: {self.empty_captions} captions came back empty")
        if self.failed:
            lines.append(f"  failed: {len(self.failed)}")
            lines += [f"    {f}: {why}" for f, why in self.failed[:20]]
        return "\n".join(lines)


def _model_type(folder: str, key: str) -> str:
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise BadPath(f"{key} {folder}: no model there (no config.json): give a local Hugging Face model folder")
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as exc:  # malformed JSON, or not UTF-8
        raise UserError(f"{key} {folder}: config.json is not valid JSON ({str(exc).splitlines()[0]})") from None
    return str(raw.get("model_type", "")) if isinstance(raw, dict) else ""


def _from_folder(load, folder: str, key: str):
    """`load(folder)` (a transformers from_pretrained); a folder that lacks a file it needs
    (weights, processor config) is a BadPath naming the folder and the config key."""
    try:
        return load(folder, local_files_only=True)
    except OSError as exc:  # transformers: what the folder lacks, in a paragraph
        raise BadPath(f"{key} {folder}: the model cannot be loaded from it ({one_line(exc)[:300]})") from None


class Captioner:
    """A local image-text-to-text model and its processor."""

    def __init__(self, folder: str, cfg: AnnotateConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        kind = _model_type(folder, "annotate.captioner")
        if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise UserError(f"annotate.captioner {folder}: a {kind!r} model does not turn images into text "
                            "(give an image-text-to-text model folder: BLIP, LLaVA, Qwen2-VL, ...)")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = _from_folder(AutoModelForImageTextToText.from_pretrained, folder, "annotate.captioner")
        self.model = self.model.to(self.device).eval()
        self.processor = _from_folder(AutoProcessor.from_pretrained, folder, "annotate.captioner")
        self.chat = bool(getattr(self.processor, "chat_template", None))
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and not self.model.config.is_encoder_decoder:
            tok.padding_side = "left"  # batched generation continues every row at its end

    def caption(self, images: List[Image.Image], prompt: str) -> List[str]:
        import torch

        text = prompt
        if self.chat:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True)
        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens,
                                      min_new_tokens=self.cfg.min_new_tokens, do_sample=False)
        prompt_ids = inputs["input_ids"]
        if ids.shape[1] >= prompt_ids.shape[1] and torch.equal(ids[:, :prompt_ids.shape[1]], prompt_ids):
            ids = ids[:, prompt_ids.shape[1]:]  # decoder-only models return the prompt first
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [_strip_prompt(t, prompt) for t in texts]


def _strip_prompt(text: str, prompt: str) -> str:
    """BLIP-style models repeat their prompt (the caption's opening words) before the caption."""
    t = " ".join(text.split())
    p = " ".join(prompt.split()).lower()
    if p and t.lower().startswith(p):
        t = t[len(p):].strip()
    return t


class Tagger:
    """A local zero-shot detector over `annotate.vocabulary`."""

    def __init__(self, folder: str, cfg: AnnotateConfig):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        kind = _model_type(folder, "annotate.detector")
        if kind not in DETECTORS:
            raise UserError(f"annotate.detector {folder}: a {kind!r} model is not a supported zero-shot detector "
                            f"(supported: {', '.join(DETECTORS)}); leave annotate.detector empty to take tags from "
                            "the captions")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = _from_folder(AutoModelForZeroShotObjectDetection.from_pretrained, folder, "annotate.detector")
        self.model = self.model.to(self.device).eval()
        self.processor = _from_folder(AutoProcessor.from_pretrained, folder, "annotate.detector")
        self.text_len = int(self.model.config.text_config.max_position_embeddings)

    def tags(self, images: List[Image.Image]) -> List[List[str]]:
        import torch

        words = list(self.cfg.vocabulary)
        inputs = self.processor(text=[words] * len(images), images=images, return_tensors="pt", padding="max_length",
                                truncation=True, max_length=self.text_len).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        found = self.processor.post_process_grounded_object_detection(
            out, threshold=self.cfg.score_threshold, target_sizes=[im.size[::-1] for im in images],
            text_labels=[words] * len(images))
        result = []
        for det in found:
            best: Dict[str, float] = {}
            for word, score in zip(det["text_labels"], det["scores"].tolist()):
                best[word] = max(best.get(word, 0.0), score)
            result.append([w for w, _ in sorted(best.items(), key=lambda x: -x[1])][: self.cfg.max_tags])
        return result


def caption_nouns(caption: str, limit: int) -> List[str]:
    """Tags from a caption when there is no detector: its words minus stop words, in order."""
    out: List[str] = []
    for word in re.findall(r"[a-z][a-z-]+", caption.lower()):
        if word not in STOP_WORDS and word not in out and not word.endswith("ing") and not word.endswith("ly"):
            out.append(word)
    return out[:limit]


def _write_sidecar(path: Path, payload: Dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def annotate_folder(folder: Path, cfg: AnnotateConfig, image: ImageConfig, data: DataConfig,
                    degradation: DegradationConfig, overwrite: bool = False, progress: bool = True) -> AnnotateSummary:
    """Write `<stem>.json` (captions x4/x2/x1 and tags) beside every image of `folder` that has
    none (every image with `overwrite`)."""
    from tqdm import tqdm

    folder = existing_folder(folder, "--input", "give the folder of photographs prepare-data will read")
    refuse_imageless(folder)  # before the models load
    if not cfg.captioner:
        raise UserError("annotate.captioner is not set: give a local image-text-to-text model folder")
    captioner = Captioner(cfg.captioner, cfg)
    tagger = Tagger(cfg.detector, cfg) if cfg.detector else None
    summary = AnnotateSummary()
    for stale in folder.rglob("*.json.tmp"):  # a sidecar being written when a run was killed
        stale.unlink()
    todo = []
    for cand in folder_candidates(folder):
        if cand.path is None or cand.path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        summary.seen += 1
        sidecar = cand.path.with_suffix(".json")
        if sidecar.is_file() and not overwrite:
            summary.kept += 1
        else:
            todo.append(cand)
    bar = tqdm(total=len(todo), desc="annotate", unit="img", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        batch: List[Tuple[Path, Image.Image, Image.Image]] = []  # (sidecar, HR crop, LR)
        for cand in todo[start:start + cfg.batch_size]:
            img, why, _ = open_image(cand.path, data.max_pixels)
            if img is None or min(img.size) < data.min_side:
                why = why or f"too small: {img.size[0]}x{img.size[1]} < data.min_side {data.min_side}"
                summary.failed.append((str(cand.path), why))
                log.warning("annotate: skipped %s: %s", cand.path, why)
                continue
            hr = center_square(img, image.hr_size)
            lr, _ = degrade(np.asarray(hr, dtype=np.uint8), (image.lr_size, image.lr_size), degradation,
                            sample_seed(data.seed, cand.id, 0))  # prepare-data's variant 0
            batch.append((cand.path.with_suffix(".json"), hr, Image.fromarray(lr)))
        bar.update(min(cfg.batch_size, len(todo) - start))
        if not batch:
            continue
        captions: Dict[str, List[str]] = {}
        for level, factor in LEVELS.items():
            side = max(1, image.hr_size // factor)
            views = [hr.resize((side, side), Image.LANCZOS) if factor > 1 else hr for _, hr, _ in batch]
            captions[level] = captioner.caption(views, cfg.prompts[level])
        tags: Optional[List[List[str]]] = tagger.tags([lr for _, _, lr in batch]) if tagger else None
        for j, (sidecar, _, _) in enumerate(batch):
            caps = {level: captions[level][j] for level in LEVELS}
            summary.empty_captions += sum(not c for c in caps.values())
            image_tags = tags[j] if tags is not None else caption_nouns(caps["x4"] or caps["x2"], cfg.max_tags)
            summary.tags_from["detector" if tags is not None else "caption nouns"] += 1
            _write_sidecar(sidecar, {"captions": caps, "tags": image_tags,
                                     "annotated_by": {"captioner": cfg.captioner, "detector": cfg.detector or None}})
            summary.written += 1
    bar.close()
    return summary
