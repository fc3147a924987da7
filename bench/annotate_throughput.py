"""`realsr-r1 annotate` images/s with the tiny random annotators (vlcot/tiny_annotators.py),
against a PIL decode of the same image files in the same run. The tiny models measure the
pipeline's own cost (cropping, the three caption levels, the LR degradation, the detector
pass, writing sidecars), not a real captioner's.

    .venv/bin/python bench/annotate_throughput.py [--copies 3] [--batch 4] [--no-detector]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from vlcot.annotate import annotate_folder  # noqa: E402
from vlcot.data import builtin_candidates  # noqa: E402
from vlcot.tiny_annotators import build_captioner, build_detector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=3, help="copies of the 11 built-in photographs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-detector", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    try:
        build_captioner(root / "blip")
        build_detector(root / "owl")
        photos = root / "photos"
        photos.mkdir()
        for cand in builtin_candidates():
            if cand.image is not None:
                for k in range(args.copies):
                    cand.image.convert("RGB").save(photos / f"{cand.id}_{k}.png")
        files = sorted(photos.glob("*.png"))
        overrides = [f"annotate.captioner={root / 'blip'}", f"annotate.batch_size={args.batch}",
                     "annotate.max_new_tokens=16", "annotate.min_new_tokens=8",
                     "annotate.prompts={x4: 'a photo of', x2: 'a photo of', x1: 'a photo of'}"]
        if not args.no_detector:
            overrides.append(f"annotate.detector={root / 'owl'}")
        cfg = load_config(overrides=overrides)
        t0 = time.perf_counter()
        for f in files:
            with Image.open(f) as im:
                im.load()
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = annotate_folder(photos, cfg.annotate, cfg.image, cfg.data, cfg.degradation, overwrite=True,
                                  progress=False)
        annotate_s = time.perf_counter() - t0
        assert summary.written == len(files), summary.render()
        print(f"PIL decode: {len(files)} images in {decode_s:.3f}s = {len(files) / decode_s:.0f} images/s")
        print(f"annotate ({'captions only' if args.no_detector else 'captions + detector'}, batch {args.batch}): "
              f"{len(files)} images in {annotate_s:.1f}s = {len(files) / annotate_s:.1f} images/s")
        print(f"annotate / PIL decode time per image: {annotate_s / decode_s:.0f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
