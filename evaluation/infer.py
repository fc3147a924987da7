"""`realsr-r1 infer`: super-resolve one image or a folder with a trained checkpoint.

For every readable input this writes, under the output folder,
    final/<name>.png   the final image (scale x the input)
    middle/<name>.png  the middle image (scale/2 x)      rough/<name>.png (scale/4 x = input size)
    cot/<name>.json    the chain of thought: per tile the parsed stages, texts, validity
and bad files go to skipped.jsonl with the reason. How inputs of any size become model-sized
prompts is `infer.mode` (evaluation/config.py: tiles by default). A tile whose generated
image stage is malformed gets the bicubic-upscaled LR tile in its place, counted in the JSON
(`fallback`), so a broken generation is visible and never a crash.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from evaluation.tiling import TilePlan, blend, count_tiles
from vlcot.errors import BadPath
from vlcot.images import IMAGE_SUFFIXES, open_image
from vlcot.trace import IMAGE_STAGE_SCALE, IMAGE_STAGES, TEXT_STAGES, build_prompt, parse_response

log = logging.getLogger(__name__)
STAGE_DIRS = {"final_image": "final", "middle_image": "middle", "rough_image": "rough"}


def list_inputs(path: str | Path, flag: str = "") -> Tuple[List[Path], List[Tuple[str, str]]]:
    """A file, or a folder's files (sorted, not recursive) -> (candidates, [(path, why skipped)]).
    A `<stem>.json` beside an image is its sidecar (labels, tags), not a skipped file. A path
    that does not exist is a BadPath naming it and `flag` (how the user gave it)."""
    p = Path(path)
    if p.is_file():
        return [p], []
    if not p.is_dir():
        raise BadPath(f"{flag + ' ' if flag else ''}{p}: no such image or folder")
    files, skipped = [], []
    entries = sorted(p.iterdir())
    image_stems = {f.stem for f in entries if f.suffix.lower() in IMAGE_SUFFIXES}
    for f in entries:
        if f.name.startswith(".") or f.is_dir() or (f.suffix == ".json" and f.stem in image_stems):
            continue  # hidden files, sub-folders, <stem>.json sidecars of images
        if f.suffix.lower() in IMAGE_SUFFIXES:
            files.append(f)
        else:
            skipped.append((str(f), f"not an image file suffix ({f.suffix or 'none'})"))
    return files, skipped


def require_images(path: str | Path, flag: str) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """`list_inputs` for a path the user gave with `flag` (e.g. "--image"), refused before any
    model loads when it holds nothing to work on: a folder without image files, or a single
    file that is not a readable image."""
    files, skipped = list_inputs(path, flag)
    p = Path(path)
    if p.is_file():
        img, why, _ = open_image(p)
        if img is None:
            raise BadPath(f"{flag} {p} is not a readable image, {why}: give an image file or a folder of them")
    elif not files:
        found = f"{len(skipped)} other files, e.g. {Path(skipped[0][0]).name}" if skipped else "it is empty"
        raise BadPath(f"{flag} {p} holds no image files ({found}); give a folder of "
                      f"{'/'.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))} images")
    return files, skipped


def output_names(files: Sequence[Path]) -> List[str]:
    """File stems, made unique (a.png and a.jpg become a and a_jpg)."""
    counts = Counter(f.stem for f in files)
    return [f.stem if counts[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}" for f in files]


class SuperResolver:
    """One engine (HF or vLLM) + the VQ tokenizer: LR image -> three stage images + trace."""

    def __init__(self, cfg, policy_dir: str | Path, vq_dir: str | Path, device: Optional[str] = None):
        import torch

        # local: the engine and tokenizer stack (ray, transformers, diffusers) loads only where a
        # resolver is built, not in the IQA-environment metric workers or the CLI that import this
        from rollout.worker import make_engine
        from vlcot.policy import load_policy_meta
        from vlcot.vq import VQTokenizer

        self.cfg = cfg
        inf = cfg.infer
        if device is None:
            device = "cuda" if inf.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        rcfg = copy.deepcopy(cfg.rollout)
        rcfg.engine, rcfg.group_size, rcfg.seed = inf.engine, 1, inf.seed
        rcfg.sampling.skeleton = rcfg.sampling.skeleton or inf.constrained
        meta = load_policy_meta(policy_dir, cfg.policy, cfg.image, cfg.vq)
        self.layout, self.codec = meta.layout, meta.codec
        self.vq = VQTokenizer.load(vq_dir)
        self.engine = make_engine(rcfg, str(policy_dir), cfg.image, cfg.policy, device)
        self.tile = cfg.image.lr_size
        self.scale = cfg.image.hr_size / cfg.image.lr_size

    # ---- one image ---------------------------------------------------------------------------
    def _generate(self, tiles: List[Image.Image], seed: int) -> List[Any]:
        im = self.cfg.image
        out: List[Any] = []
        for k, i in enumerate(range(0, len(tiles), self.cfg.infer.batch_tiles)):
            chunk = tiles[i:i + self.cfg.infer.batch_tiles]
            codes = self.vq.encode_images(chunk, im.prompt_size)
            prompts = [build_prompt(c, self.codec, self.layout) for c in codes]
            out.extend(self.engine.generate(prompts, n=1, seed=seed + k, greedy=self.cfg.infer.greedy))
        return out

    def super_resolve(self, img: Image.Image, seed: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """RGB image -> ({stage: uint8 image}, record for the JSON). `seed` defaults to
        infer.seed; `run_file` derives one per file name, so an image's output does not
        depend on which actor or in which order it was processed (HF engine)."""
        inf = self.cfg.infer
        w0, h0 = img.size
        record: Dict[str, Any] = {"input_size": [w0, h0], "mode": inf.mode, "scale": self.scale, "prescale": 1.0}
        if inf.mode == "resize":
            plan = TilePlan(self.tile, self.tile, self.tile, 0)
            lr = np.asarray(img.resize((self.tile, self.tile), Image.BICUBIC))
        else:
            n = count_tiles(w0, h0, self.tile, inf.tile_overlap)
            if n > inf.max_tiles:
                s = math.sqrt(inf.max_tiles / n)
                while True:
                    w, h = max(1, int(w0 * s)), max(1, int(h0 * s))
                    if count_tiles(w, h, self.tile, inf.tile_overlap) <= inf.max_tiles:
                        break
                    s *= 0.95
                img = img.resize((w, h), Image.BICUBIC)
                record["prescale"] = w / w0
            plan = TilePlan(img.size[0], img.size[1], self.tile, inf.tile_overlap)
            lr = np.asarray(img)
        padded = plan.pad(lr)
        boxes = plan.boxes()
        tiles = [Image.fromarray(padded[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes]
        results = self._generate(tiles, self.cfg.infer.seed if seed is None else seed)
        stage_tiles: Dict[str, List[np.ndarray]] = {s: [] for s in IMAGE_STAGES}
        tile_records = []
        for box, tile, res in zip(boxes, tiles, results):
            tr: Dict[str, Any] = {"box": list(box), "fallback": []}
            parsed = None
            if isinstance(res, list) and res:
                sample = res[0]
                parsed = parse_response(sample.token_ids, self.codec, self.layout, hr_size=self.cfg.image.hr_size)
                tr.update(finish_reason=sample.finish_reason, tokens=len(sample.token_ids),
                          strict_format=bool(parsed.strict_format), degradation=parsed.degradation,
                          texts={s: parsed.stages[s].text for s in TEXT_STAGES if parsed.stages[s].valid},
                          invalid=parsed.invalid_reasons())
            else:
                tr.update(error=getattr(res, "reason", "no sample"), strict_format=False)
            for stage in IMAGE_STAGES:
                size = int(round(self.tile * self.scale / IMAGE_STAGE_SCALE[stage]))
                st = parsed.stages.get(stage) if parsed is not None else None
                if st is not None and st.valid and st.codes is not None:
                    out = np.asarray(self.vq.decode_images(st.codes[None])[0])
                else:
                    out = None
                if out is None or out.shape[:2] != (size, size):
                    tr["fallback"].append(stage)
                    out = np.asarray(tile.resize((size, size), Image.BICUBIC))
                stage_tiles[stage].append(out)
            tile_records.append(tr)
        images = {}
        for stage in IMAGE_STAGES:
            factor = self.scale / IMAGE_STAGE_SCALE[stage]
            out = blend(plan, stage_tiles[stage], factor)
            if inf.mode == "resize":
                size = (max(1, round(w0 * factor)), max(1, round(h0 * factor)))
                out = np.asarray(Image.fromarray(out).resize(size, Image.BICUBIC))
            images[stage] = out
        record["output_size"] = [int(images["final_image"].shape[1]), int(images["final_image"].shape[0])]
        record["tiles"] = tile_records
        record["strict_format_rate"] = float(np.mean([t.get("strict_format", False) for t in tile_records]))
        record["fallback_tiles"] = {s: sum(s in t["fallback"] for t in tile_records) for s in IMAGE_STAGES}
        record["degradation"] = _vote([t.get("degradation") for t in tile_records])
        return images, record

    # ---- files -------------------------------------------------------------------------------
    def run_file(self, path: str | Path, name: str, out_dir: str | Path) -> Dict[str, Any]:
        """One input file -> outputs under out_dir; {"status": "ok"|"skipped", ...}."""
        img, why, note = open_image(path)
        if img is None:
            return {"status": "skipped", "input": str(path), "reason": why}
        t0 = time.perf_counter()
        try:
            images, record = self.super_resolve(img, (self.cfg.infer.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31)
        except Exception as exc:  # one bad image must not stop a folder
            log.exception("infer failed on %s", path)
            return {"status": "skipped", "input": str(path), "reason": f"{type(exc).__name__}: {exc}"}
        out = Path(out_dir)
        files = {}
        for stage, sub in STAGE_DIRS.items():
            f = out / sub / f"{name}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[stage]).save(f)
            files[sub] = str(f)
        record.update(status="ok", input=str(path), name=name, conversion=note, seconds=time.perf_counter() - t0)
        f = out / "cot" / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        files["json"] = str(f)
        record["files"] = files
        f.write_text(json.dumps(record, indent=2))
        return record


def _vote(slots: Sequence[Optional[Sequence[Optional[str]]]]) -> List[Optional[str]]:
    """Per-slot majority over tiles (ties: the first tile's word)."""
    rows = [s for s in slots if s]
    if not rows:
        return [None] * 5
    out = []
    for i in range(len(rows[0])):
        words = [r[i] for r in rows if i < len(r) and r[i]]
        out.append(Counter(words).most_common(1)[0][0] if words else None)
    return out


def run_infer(resolver: SuperResolver, files: Sequence[Path], names: Sequence[str], out_dir: str | Path,
              progress: bool = True) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    out = []
    for f, name in tqdm(list(zip(files, names)), desc="infer", unit="img", disable=not progress or len(files) < 2):
        rec = resolver.run_file(f, name, out_dir)
        if rec["status"] != "ok":
            tqdm.write(f"skipped {f}: {rec['reason']}")
        out.append(rec)
    return out


def write_skipped(out_dir: str | Path, skipped: Sequence[Dict[str, Any]]) -> Optional[Path]:
    if not skipped:
        return None
    f = Path(out_dir) / "skipped.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps({"input": s["input"], "reason": s["reason"]}) + "\n" for s in skipped))
    return f
