"""Can the policy see the degradation at all? A probe on the prompt the policy reads.

The degradation reward asks the policy to name five words (blur, resize, noise, compression,
final resize) from its prompt: the LR image, bicubic-upsampled to `image.prompt_size` and
VQ-encoded. If no classifier can read a slot's word from that prompt better than always
naming the most frequent word, no amount of RL will: the policy can only learn the prior.

This draws many random crops of the built-in photographs (or of `data.input_dir`: your own
images, e.g. at the paper's sizes), degrades each with a fresh seed
(the configured synthesis and label thresholds), splits crops into train and test (a crop
is in one split only), and fits per slot, on the train split:
- `lr`: hand-made statistics of the LR pixels (what is in the image before the tokenizer),
- `codes`: the prompt's codebook vectors, and statistics of the image decoded from its codes
  (what survives the tokenizer, i.e. what the policy reads),
then prints test accuracy next to the majority-word baseline, per slot and over the five.

    .venv/bin/python bench/degradation_probe.py [--crops 40] [--draws 2] [key=value overrides]
    .venv/bin/python bench/degradation_probe.py data.input_dir=DIR image.hr_size=512 image.lr_size=128 \
        image.prompt_size=512 image.patch_px=128 vq.checkpoint=PATH    # paper scale, your images
"""

import argparse
import os
from pathlib import Path
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from vlcot.data import builtin_candidates, folder_candidates, sample_seed  # noqa: E402
from vlcot.images import open_image  # noqa: E402
from vlcot.degradation import LEVEL_WORDS, degrade, label_degradation  # noqa: E402
from vlcot.trace import SLOTS  # noqa: E402
from vlcot.vq import vq_from_config  # noqa: E402
from PIL import Image  # noqa: E402


def pixel_stats(img: np.ndarray) -> np.ndarray:
    """Statistics of an [H, W, 3] uint8 image that blur, noise and JPEG move: high-pass
    energy at two scales, gradient energy on and off 8-px block edges, colour spread."""
    x = img.astype(np.float64) / 255.0
    g = x.mean(axis=2)
    dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    block_x = dx[:, 7::8].mean() if dx.shape[1] > 8 else 0.0
    block_y = dy[7::8, :].mean() if dy.shape[0] > 8 else 0.0
    chroma = (x - x.mean(axis=2, keepdims=True)).std()
    feats = [dx.mean(), dy.mean(), lap.mean(), lap.std(), np.percentile(lap, 90), g.std(),
             block_x / (dx.mean() + 1e-6), block_y / (dy.mean() + 1e-6), chroma,
             np.abs(np.diff(x, axis=2)).mean()]
    return np.asarray(feats + [np.log(f + 1e-6) for f in feats[:5]])


def pooled_vectors(book: np.ndarray, codes: np.ndarray, grid: int = 8) -> np.ndarray:
    """The codebook vectors of an [h, w] code grid, averaged down to at most grid x grid."""
    v = book[codes]  # [h, w, d]
    k = max(1, codes.shape[0] // grid)
    h, w, d = v.shape
    return v[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k, d).mean(axis=(1, 3)).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crops", type=int, default=40, help="random crops per photograph")
    ap.add_argument("--draws", type=int, default=2, help="degradations per crop")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--even-edges", action="store_true",
                    help="label blur, noise and compression by the quartiles of their measured strength (printed)"
                         " instead of the configured edges: readability apart from where the edges sit")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from sklearn.ensemble import HistGradientBoostingClassifier

    cfg = load_config(overrides=args.overrides)
    im, deg = cfg.image, cfg.degradation
    vq = vq_from_config(cfg.vq).eval()
    book = vq._normalised_codebook().detach().numpy()
    rng = np.random.default_rng(0)
    t0 = time.time()
    rows = []  # (crop key, lr uint8, labels, strengths)
    skipped = 0
    for cand in folder_candidates(Path(cfg.data.input_dir)) if cfg.data.input_dir else builtin_candidates():
        img = cand.image if cand.path is None else open_image(cand.path, cfg.data.max_pixels)[0]
        if img is None or min(img.size) < im.hr_size:
            skipped += 1  # unreadable, or smaller than one HR crop
            continue
        img = img.convert("RGB")
        w, h = img.size
        short = min(w, h)
        for c in range(args.crops):
            side = int(rng.integers(max(im.hr_size, short // 3), short + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            hr = np.asarray(img.crop((x0, y0, x0 + side, y0 + side)).resize((im.hr_size, im.hr_size), Image.BICUBIC))
            for d in range(args.draws):
                lr, params = degrade(hr, (im.lr_size, im.lr_size), deg, sample_seed(7, f"{cand.id}_{c}", d))
                rows.append((f"{cand.id}_{c}", lr, label_degradation(params, deg.thresholds), params["strength"]))
    if not rows:
        raise SystemExit(f"no usable image ({skipped} skipped: unreadable or under {im.hr_size} px)")
    lrs = [Image.fromarray(r[1]) for r in rows]
    codes = vq.encode_images(lrs, im.prompt_size)  # [N, h, w]
    decoded = vq.decode_images(codes)
    feats = {
        "lr": np.stack([pixel_stats(r[1]) for r in rows]),
        "codes": np.stack([np.concatenate([pooled_vectors(book, c), pixel_stats(np.asarray(d))])
                           for c, d in zip(codes, decoded)]),
    }
    keys = sorted({r[0] for r in rows})
    test_keys = set(rng.choice(keys, size=int(len(keys) * args.test_fraction), replace=False).tolist())
    test = np.array([r[0] in test_keys for r in rows])
    labels = np.array([r[2] for r in rows])
    lr_measure = deg.thresholds.measure == "lr"
    level_slots = ((0, "blur_sigma", "lr_blur_rms"), (2, "noise_std", "lr_noise_rms"), (3, "jpeg_quality", "lr_jpeg_rms"))
    for i, synthesis_key, lr_key in level_slots:
        key = lr_key if lr_measure else synthesis_key
        v = np.array([r[3][key] for r in rows])
        edges = np.percentile(v[~test], [25, 50, 75])
        print(f"{key:13s} p10/25/50/75/90 " + " / ".join(f"{x:.2f}" for x in np.percentile(v, [10, 25, 50, 75, 90])))
        if args.even_edges:
            sign = -1 if key == "jpeg_quality" else 1
            labels[:, i] = np.array(LEVEL_WORDS)[np.digitize(sign * v, np.sort(sign * edges))]
    print(f"{len(rows)} prompts ({len(keys)} crops, {test.sum()} test prompts; {skipped} images skipped), LR {im.lr_size} px, prompt "
          f"{im.prompt_size} px = {codes.shape[1]}x{codes.shape[2]} codes; {time.time() - t0:.0f} s to draw and encode")
    print(f"{'slot':13s} {'majority':>8s} " + " ".join(f"{k:>8s}" for k in feats))
    totals = {k: [] for k in ["majority", *feats]}
    for i, slot in enumerate(SLOTS):
        y_tr, y_te = labels[~test, i], labels[test, i]
        words, counts = np.unique(y_tr, return_counts=True)
        majority = float((y_te == words[counts.argmax()]).mean())
        accs = {"majority": majority}
        for name, x in feats.items():
            if len(words) == 1:
                accs[name] = majority
                continue
            clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_depth=3, random_state=0)
            clf.fit(x[~test], y_tr)
            accs[name] = float((clf.predict(x[test]) == y_te).mean())
        for k, v in accs.items():
            totals[k].append(v)
        print(f"{slot:13s} " + " ".join(f"{accs[k]:8.3f}" for k in totals))
    print(f"{'mean of five':13s} " + " ".join(f"{np.mean(v):8.3f}" for v in totals.values()))


if __name__ == "__main__":
    main()
