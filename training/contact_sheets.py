"""Contact sheets: PNGs of labelled image cells side by side, for a person to look at.

The per-sample sheet logged every N training steps (LR | rough | middle | final | HR, the
trace text below) and the comparison rows of `realsr-r1 eval`. They are saved and logged
under `grids/` (the artifact folder's name, kept for existing runs); a "grid" in the code
elsewhere is the token grid of an image's VQ codes (rollout/rules.py, vlcot/layout.py)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlcot.manifest import ManifestRecord

log = logging.getLogger(__name__)


def sample_sheet(lr: Image.Image, stages: Sequence[Optional[np.ndarray]], hr: Image.Image, text: str,
                cell: int = 192) -> Image.Image:
    """Five cells of `cell` px (missing stages drawn grey with an x) and the trace text."""
    tiles = [lr] + [Image.fromarray(s) if s is not None else None for s in stages] + [hr]
    labels = ["LR", "rough", "middle", "final", "HR"]
    lines = []
    for para in text.splitlines() or [""]:
        lines += textwrap.wrap(para, width=cell * 5 // 7) or [""]
    lines = lines[:24]
    canvas = Image.new("RGB", (cell * 5, cell + 16 + 12 * len(lines) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    _draw_cells(canvas, draw, tiles, labels, cell)
    for j, line in enumerate(lines):
        draw.text((4, cell + 20 + 12 * j), line, fill=(0, 0, 0))
    return canvas


def log_sample_sheet(out: Path, parsed, record: ManifestRecord, vq, tracker) -> None:
    """The contact sheet of one training sample (its trace `parsed`, the manifest `record` it was
    prompted with) written to `out` and logged to MLflow under grids/. A failure is logged,
    never raised: a logging extra must not stop training."""
    try:
        stages = []
        for name in ("rough_image", "middle_image", "final_image"):
            st = parsed.stages[name]
            stages.append(np.asarray(vq.decode_images(st.codes[None])[0]) if st.valid else None)
        img = sample_sheet(Image.open(record.lr_path), stages, Image.open(record.hr_path), parsed.skeleton)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out)
        tracker.artifact(str(out), "grids")
    except Exception as exc:
        log.warning("could not log the sample sheet %s: %s", out.name, exc)


def _draw_cells(canvas: Image.Image, draw: ImageDraw.ImageDraw, tiles: Sequence[Optional[Image.Image]],
                labels: Sequence[str], cell: int) -> None:
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = i * cell
        if tile is None:
            draw.rectangle([x, 16, x + cell - 1, 16 + cell - 1], fill=(200, 200, 200))
            draw.line([x, 16, x + cell - 1, 16 + cell - 1], fill=(120, 120, 120))
            draw.line([x, 16 + cell - 1, x + cell - 1, 16], fill=(120, 120, 120))
        else:
            canvas.paste(tile.convert("RGB").resize((cell, cell), Image.NEAREST), (x, 16))
        draw.text((x + 4, 2), label, fill=(0, 0, 0))


def comparison_row(images: Sequence[Optional[Image.Image]], labels: Sequence[str], cell: int = 192) -> Image.Image:
    """One labelled cell per image (None drawn as a crossed grey cell), left to right."""
    canvas = Image.new("RGB", (cell * len(images), cell + 16), "white")
    _draw_cells(canvas, ImageDraw.Draw(canvas), images, labels, cell)
    return canvas
