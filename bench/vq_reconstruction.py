"""Reconstruction quality of the shipped tiny VQ on photographs it never saw, against bicubic x8.

Held-out photographs: the reference images pyiqa's packages ship into the IQA environment
(ResultsCalibra/ref_dir, pyiqa's tests/test_efficiency_img_dir); `train-vq` reads none of
them. From each: its centre square resized to 128 px (what prepare-data makes of a photograph
for the demo) and the four corner 128-px crops of the photograph resized to 256 px on its
short side. Baseline on the same crops in the same run: PIL bicubic down to 16 px (x8) and
back up, the information a 16x16 thumbnail carries; a VQ's 16x16 codes of 14 bits carry less.
PSNR is on the Y channel (eval's convention). Throughput: encode / decode per 128-px image
against one PIL bicubic resize of the same image, timed here.

    .venv/bin/python bench/vq_reconstruction.py [--vq DIR] [--held-out DIR]
"""

import argparse
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import best_time, report  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.interpreters import iqa_python  # noqa: E402
from vlcot.fidelity import psnr_y  # noqa: E402
from vlcot.data import center_square  # noqa: E402
from vlcot.images import open_image  # noqa: E402
from vlcot.vq import VQTokenizer, pil_to_tensor, vq_from_config  # noqa: E402
from vlcot.vq_train import reconstruction_psnr  # noqa: E402

SIZE = 128
FIND_HELD_OUT = ("import importlib.util as u, os\n"
                 "for mod, sub in (('ResultsCalibra', 'ref_dir'), ('tests', 'test_efficiency_img_dir')):\n"
                 "    s = u.find_spec(mod)\n"
                 "    if s and s.submodule_search_locations:\n"
                 "        d = os.path.join(list(s.submodule_search_locations)[0], sub)\n"
                 "        if os.path.isdir(d): print(d)\n")


def held_out_folders() -> list:
    """The held-out photograph folders inside the IQA environment (pyiqa's dependencies)."""
    py = iqa_python(load_config().envs)
    out = subprocess.run([py, "-I", "-c", FIND_HELD_OUT], capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in out.split()]


def crops(photo: Image.Image) -> list:
    out = [center_square(photo, SIZE)]
    w, h = photo.size
    s = 2 * SIZE / min(w, h)
    half = photo.resize((max(2 * SIZE, round(w * s)), max(2 * SIZE, round(h * s))), Image.LANCZOS)
    W, H = half.size
    out += [half.crop((x, y, x + SIZE, y + SIZE)) for x in (0, W - SIZE) for y in (0, H - SIZE)]
    return out


def bicubic_x8(img: Image.Image) -> Image.Image:
    return img.resize((SIZE // 8, SIZE // 8), Image.BICUBIC).resize((SIZE, SIZE), Image.BICUBIC)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vq", default=None, help="VQ folder (default: the tiny-cpu config's vq.checkpoint)")
    ap.add_argument("--held-out", action="append", default=[], help="folder of photographs (default: see above)")
    args = ap.parse_args()
    cfg = load_config()
    vq = VQTokenizer.load(args.vq) if args.vq else vq_from_config(cfg.vq)
    folders = [Path(d) for d in args.held_out] or held_out_folders()
    photos = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            img, _, _ = open_image(path)
            if img is not None:
                photos.append((path.name, img))
    if not photos:
        sys.exit(f"no held-out photographs found in {folders}")
    print(f"held-out: {len(photos)} photographs from {[str(f) for f in folders]}; torch threads {torch.get_num_threads()}")
    random_vq = VQTokenizer(replace(cfg.vq, checkpoint=""))  # what the demo used before the trained one
    rows = []
    for name, photo in photos:
        cs = crops(photo)
        bic = [psnr_y(np.asarray(bicubic_x8(c)), np.asarray(c)) for c in cs]
        rows.append((name, np.mean([reconstruction_psnr(vq, c) for c in cs]), np.mean(bic),
                     np.mean([reconstruction_psnr(random_vq, c) for c in cs])))
        print(f"  {name:32s} vq {rows[-1][1]:6.2f} dB  bicubic x8 {rows[-1][2]:6.2f} dB  random vq {rows[-1][3]:6.2f} dB")
    v, b, r = (float(np.mean([row[i] for row in rows])) for i in (1, 2, 3))
    print(f"PSNR (Y) over {len(rows) * 5} crops of {SIZE} px: trained VQ {v:.2f} dB, bicubic x8 {b:.2f} dB, "
          f"random VQ {r:.2f} dB")
    print(f"trained VQ - bicubic x8 = {v - b:+.2f} dB (goal: >= -1.00); random VQ - bicubic x8 = {r - b:+.2f} dB")

    img = crops(photos[0][1])[0]
    x = pil_to_tensor(img)[None].repeat(8, 1, 1, 1)
    codes = vq.encode(x)
    ref = best_time(lambda: img.resize((SIZE // 4, SIZE // 4), Image.BICUBIC))
    report(f"encode {SIZE}px (batch 8)", best_time(lambda: vq.encode(x), repeat=3, min_time=0.5) / 8, ref,
           f"PIL bicubic {SIZE}->{SIZE // 4}")
    report(f"decode {SIZE}px (batch 8)", best_time(lambda: vq.decode(codes), repeat=3, min_time=0.5) / 8, ref,
           f"PIL bicubic {SIZE}->{SIZE // 4}")


if __name__ == "__main__":
    main()
