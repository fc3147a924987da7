"""`realsr-r1 infer` throughput on the tiny config: images/s of whole-image x4 super-resolution
(tiles, generation, VQ decode, blending, file writes), beside PIL bicubic x4 of the same
images timed in the same run.

    .venv/bin/python bench/infer_throughput.py [--checkpoint DIR] [--images 6] [--size 64] [key=value ...]

Without --checkpoint the tiny random policy is used: it writes the longest possible traces
(the text budget), so it is the slow end; pass a trained run folder for realistic traces.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import astronaut, best_time  # noqa: E402
from cluster.config import load_config  # noqa: E402
from app.infer_job import resolve_checkpoint  # noqa: E402
from evaluation.infer import SuperResolver, output_names, run_infer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", type=int, default=64, help="LR side in px (64 = 3x3 tiles of 32 at overlap 8)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    cfg = load_config(overrides=[f"run_dir={tmp}", *args.overrides])
    if args.checkpoint:
        ck = resolve_checkpoint(args.checkpoint)
        policy_dir, vq_dir = ck.policy_dir, ck.vq_dir
    else:
        from vlcot.policy import build_tiny_policy
        from vlcot.vq import vq_from_config

        policy_dir = build_tiny_policy(cfg.policy, cfg.image, cfg.vq).save(tmp / "policy")
        vq_dir = vq_from_config(cfg.vq).save(tmp / "vq")
    src = tmp / "in"
    src.mkdir()
    base = astronaut(512)
    files = []
    for i in range(args.images):  # different crops: no two prompts alike
        crop = base.crop((i * 40, i * 30, i * 40 + 256, i * 30 + 256)).resize((args.size, args.size), Image.BICUBIC)
        f = src / f"img{i}.png"
        crop.save(f)
        files.append(f)
    t0 = time.perf_counter()
    resolver = SuperResolver(cfg, policy_dir, vq_dir)
    load_s = time.perf_counter() - t0
    run_infer(resolver, files[:1], ["warmup"], tmp / "warm", progress=False)
    t0 = time.perf_counter()
    recs = run_infer(resolver, files, output_names(files), tmp / "out", progress=False)
    dt = time.perf_counter() - t0
    tiles = sum(len(r["tiles"]) for r in recs if r["status"] == "ok")
    imgs = [Image.open(f).convert("RGB") for f in files]
    ref = best_time(lambda: [im.resize((4 * args.size, 4 * args.size), Image.BICUBIC) for im in imgs]) / len(imgs)
    rate = len(files) / dt
    print(f"infer ({cfg.infer.engine} engine, {cfg.infer.mode} mode, {args.size}px inputs, {tiles / len(files):.0f} "
          f"tiles/image): {rate:.3f} images/s ({dt / len(files):.2f} s/image, {tiles / dt:.2f} tiles/s); "
          f"engine load {load_s:.1f}s")
    print(f"reference PIL bicubic x4: {1 / ref:.0f} images/s; ratio infer/bicubic time: {(dt / len(files)) / ref:.0f}x")


if __name__ == "__main__":
    main()
