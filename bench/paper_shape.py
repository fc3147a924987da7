"""The published run rehearsed at paper shape on this CPU (configs/paper-shape-cpu.yaml), measured.

Prints, in order (docs/paper-shape.md records a run):
1. tokens per trace (prompt, each image span, text, total) against the 7B config headers' arithmetic;
2. per GRPO step: generation, CFG twins, reward, learner and sync time; each role's peak RSS; the
   same for the demo (configs/tiny-cpu.yaml) and which part grows fastest from demo to paper shape;
3. KV pressure: one group generated with a KV cache too small for its samples and twins at once,
   against a roomy cache: codes drawn without guidance, and whether the outputs are the same;
4. prompt encoding at scale: N prepared 512-px prompts encoded at a start without the cache (every
   start and resume before) and with it (every start after the first);
5. `realsr-r1 infer` and `realsr-r1 eval` on the rehearsal's checkpoint at 512 px (LR 128 tiles).

    .venv/bin/python bench/paper_shape.py [--skip-demo] [--skip-kv] [--skip-infer] [--images 200]
    (a run takes about an hour on 2 cores; --only-infer repeats section 5 on an existing run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
CONFIG = "configs/paper-shape-cpu.yaml"
# the 7B headers' arithmetic (configs/pure-7b.yaml, pure-7b-published.yaml): what the rehearsal must show
HEADER = {"prompt": 4338, "rough_image": 276, "middle_image": 1060, "final_image": 4164, "text": 512,
          "response": 6012}
ROLES = {"learner": "ray::LearnerWorker", "rollout": "ray::RolloutWorker", "reward": "ray::RewardWorker"}
PARTS = ("generate", "reward", "learn", "sync")


def train(config: str, run_dir: Path, extra: List[str]) -> Dict:
    """`realsr-r1 train` as a user runs it; peak RSS of each role's processes sampled meanwhile."""
    import psutil

    cmd = [PY, "-m", "app.cli", "train", "--config", config, f"run_dir={run_dir}",
           f"data.output_dir={run_dir / 'data'}", "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {r: 0 for r in (*ROLES, "driver")}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info", "pid"]):
                try:
                    line = " ".join(p.info["cmdline"] or [])
                    rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
                except (psutil.Error, TypeError):
                    continue
                if p.info["pid"] == proc.pid:
                    peaks["driver"] = max(peaks["driver"], rss)
                for role, prefix in ROLES.items():
                    if line.startswith(prefix):
                        peaks[role] = max(peaks[role], rss)
            done.wait(0.5)

    threading.Thread(target=sample, daemon=True).start()
    out = proc.communicate()[0]
    done.set()
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(out[-4000:])
        raise SystemExit(f"train --config {config} failed with exit code {proc.returncode}")
    return {"wall_s": wall, "peak_rss_gb": {k: v / 2**30 for k, v in peaks.items()}, "steps": step_metrics(run_dir),
            "log": out}


def step_metrics(run_dir: Path) -> List[Dict[str, float]]:
    """Every logged metric of each GRPO step, from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = max(runs, key=lambda r: r.info.start_time)
    steps: Dict[int, Dict[str, float]] = {}
    for key in run.data.metrics:
        if key.startswith(("timing/", "trace/", "rollout/", "reward/total")):
            for m in client.get_metric_history(run.info.run_id, key):
                steps.setdefault(m.step, {})[key] = m.value
    return [steps[k] for k in sorted(steps)]


def prompt_tokens(run_dir: Path) -> int:
    """The rehearsal policy's prompt length for one LR image at 512 px (64x64 codes)."""
    import numpy as np

    from cluster.config import load_config
    from vlcot.policy import load_policy_meta
    from vlcot.trace import build_prompt

    cfg = load_config(ROOT / CONFIG, [f"run_dir={run_dir}"])
    meta = load_policy_meta(run_dir / "policy_init", cfg.policy, cfg.image, cfg.vq)
    side = cfg.image.prompt_size // 8
    return len(build_prompt(np.zeros((side, side), dtype=np.int64), meta.codec, meta.layout))


def report_tokens(paper: Dict, run_dir: Path) -> None:
    steps = paper["steps"]
    mean = {k: sum(s.get(f"trace/{k}_tokens", 0.0) for s in steps) / len(steps)
            for k in ("response", "text", "rough_image", "middle_image", "final_image")}
    measured = {"prompt": prompt_tokens(run_dir), **{k: mean[k] for k in ("rough_image", "middle_image", "final_image",
                                                                         "text", "response")}}
    print("\n## 1. tokens per trace (mean over the GRPO steps' samples)")
    print(f"{'':14s} {'7B header':>10s} {'measured':>10s}")
    for k, v in HEADER.items():
        print(f"{k:14s} {v:>10,d} {measured[k]:>10,.0f}")
    full = min(s.get("trace/all_images_fraction", 0.0) for s in steps)
    print(f"total per trace: {measured['prompt'] + measured['response']:,.0f} tokens (header "
          f"{HEADER['prompt'] + HEADER['response']:,}); samples with all three images: {full:.0%} (lowest step)")


def report_steps(name: str, run: Dict) -> Dict[str, float]:
    steps = run["steps"][1:] or run["steps"]  # the first step includes warm-up when there are more
    avg = {p: sum(s.get(f"timing/{p}_s", 0.0) for s in steps) / len(steps) for p in PARTS}
    twins = sum(s.get("rollout/cfg_twins", 0.0) for s in steps) / len(steps)
    unguided = sum(s.get("rollout/cfg_unguided_codes", 0.0) for s in steps)
    rss = ", ".join(f"{k} {v:.2f}" for k, v in run["peak_rss_gb"].items())
    print(f"{name}: " + ", ".join(f"{p} {avg[p]:.2f}s" for p in PARTS) + f" per step; CFG twins {twins:.0f} per "
          f"step, unguided codes {unguided:.0f}; peak RSS GB: {rss}; whole run {run['wall_s']:.0f}s")
    return avg


def kv_child(policy_dir: str, blocks: int, out: str) -> None:
    """One group generated by a vLLM engine with `blocks` KV blocks (0 = sized by the engine)."""
    from cluster.config import load_config
    from rollout.worker import make_engine
    from vlcot.manifest import read_manifest
    from vlcot.vq import VQTokenizer
    from vlcot.policy import load_policy_meta
    from vlcot.prompt_cache import CACHE_DIR, cached_prompt_codes
    from vlcot.trace import build_prompt

    run_dir = Path(policy_dir).parents[1]
    cfg = load_config(ROOT / CONFIG, [f"run_dir={run_dir}", f"rollout.kv_cache_blocks={blocks}"])
    manifest = run_dir / "data" / "manifest.jsonl"
    vq = VQTokenizer.load(run_dir / "vq")
    codes, _ = cached_prompt_codes([read_manifest(manifest)[0].lr_path], vq, cfg.image.prompt_size,
                                   manifest.parent / CACHE_DIR)
    meta = load_policy_meta(policy_dir, cfg.policy, cfg.image, cfg.vq)
    engine = make_engine(cfg.rollout, policy_dir, cfg.image, cfg.policy, "cpu")
    t0 = time.perf_counter()
    samples = engine.generate([build_prompt(codes[0], meta.codec, meta.layout)], seed=7)[0]
    json.dump({"tokens": [s.token_ids for s in samples], "seconds": time.perf_counter() - t0,
               "unguided": engine.throughput.cfg_unguided_codes, "twins": engine.throughput.cfg_twins}, open(out, "w"))


def report_kv(policy_dir: Path) -> None:
    print("\n## 3. KV pressure: one prompt x G 5 with CFG twins, roomy cache vs too small for all at once")
    got = {}
    for blocks in (0, 250):  # 128-token CPU blocks: a sample + its twin need ~110, all five ~550
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([PY, __file__, "--kv-child", str(policy_dir), str(blocks), f.name], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            got[blocks] = json.load(open(f.name))
        g = got[blocks]
        print(f"kv_cache_blocks {blocks or 'engine-sized'}: {g['seconds']:.0f}s, twins {g['twins']}, "
              f"unguided codes {g['unguided']}, response tokens {[len(t) for t in g['tokens']]}")
    same = got[0]["tokens"] == got[250]["tokens"]
    print(f"outputs identical token for token: {same}")


def report_encoding(n: int, run_dir: Path) -> None:
    """N LR images (128 px crops of the built-in photographs) encoded at 512 px as a start does."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from vlcot.prompt_cache import cached_prompt_codes
    from vlcot.vq import VQTokenizer

    print(f"\n## 4. prompt encoding at a start: {n} prepared LR 128 px prompts, encoded at 512 px")
    vq = VQTokenizer.load(run_dir / "vq")
    src = [skimage.data.astronaut(), skimage.data.retina(), skimage.data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            img = src[i % len(src)]
            y, x = rng.integers(0, img.shape[0] - 511), rng.integers(0, img.shape[1] - 511)
            p = Path(tmp) / f"{i}.png"
            Image.fromarray(img[y:y + 512, x:x + 512]).resize((128, 128), Image.BICUBIC).save(p)
            paths.append(str(p))
        cache = Path(tmp) / "prompt_codes"
        t0 = time.perf_counter()
        cached_prompt_codes(paths, vq, 512, cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, encoded = cached_prompt_codes(paths, vq, 512, cache)
        warm = time.perf_counter() - t0
    print(f"without the cache (every start and --resume before): {cold:.1f}s; with it: {warm:.2f}s "
          f"({encoded} encoded); ratio {cold / warm:.0f}x")


def report_infer_eval(run_dir: Path) -> None:
    import skimage.data
    from PIL import Image

    print("\n## 5. infer and eval on the rehearsal checkpoint at 512 px (LR 128 tiles)")
    ckpt = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    with tempfile.TemporaryDirectory() as tmp:
        lr, hr = Path(tmp) / "lr", Path(tmp) / "hr"
        lr.mkdir()
        hr.mkdir()
        img = Image.fromarray(skimage.data.astronaut())
        img.save(hr / "astronaut.png")
        img.resize((128, 128), Image.BICUBIC).save(lr / "astronaut.png")
        for name, cmd in (("infer", ["infer", "--checkpoint", str(ckpt), "--image", str(lr / "astronaut.png"),
                                     "--out", f"{tmp}/infer", "infer.constrained=true"]),
                          ("eval", ["eval", "--checkpoint", str(ckpt), "--data", f"one={lr},{hr}", "--out",
                                    f"{tmp}/eval", "infer.constrained=true"])):
            t0 = time.perf_counter()
            r = subprocess.run([PY, "-m", "app.cli", *cmd, "--config", CONFIG, "--no-progress"], cwd=ROOT,
                               capture_output=True, text=True)
            wrote = sorted(str(p.relative_to(tmp)) for p in Path(tmp, name).rglob("*") if p.is_file())
            print(f"{name}: exit {r.returncode} in {time.perf_counter() - t0:.0f}s; wrote {len(wrote)} files "
                  f"({', '.join(wrote[:6])}{', ...' if len(wrote) > 6 else ''})")
            if r.returncode:
                print(r.stderr[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench-paper-shape")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-kv", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--only-infer", action="store_true", help="section 5 alone, on an existing --run-dir")
    ap.add_argument("--kv-child", nargs=3, metavar=("POLICY", "BLOCKS", "OUT"), help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.kv_child:
        return kv_child(args.kv_child[0], int(args.kv_child[1]), args.kv_child[2])
    run_dir = (ROOT / args.run_dir).resolve()
    if args.only_infer:
        return report_infer_eval(run_dir)
    paper = train(CONFIG, run_dir, extra)
    print(f"# paper-shape rehearsal: `realsr-r1 train --config {CONFIG}` ran to the end in {paper['wall_s']:.0f}s")
    report_tokens(paper, run_dir)
    print("\n## 2. per GRPO step (steps after the first where there are several)")
    avg = report_steps("paper shape", paper)
    if not args.skip_demo:
        demo = train("configs/tiny-cpu.yaml", run_dir.parent / f"{run_dir.name}-demo",
                     ["trainer.steps=3", "learner.sft.steps=10", "trainer.heldout_eval=false"])
        base = report_steps("demo shape", demo)
        # a part the demo hides almost entirely (reward_s is the wait after generation) has no ratio
        ratios = {p: avg[p] / base[p] for p in PARTS if base[p] >= 0.1}
        fastest = max(ratios, key=ratios.get)
        print("paper / demo: " + ", ".join(f"{p} {r:.1f}x" for p, r in ratios.items()) + f"; fastest growing: {fastest}"
              + "".join(f"; {p} {avg[p]:.2f}s vs {base[p]:.2f}s (too small in the demo to compare)"
                        for p in PARTS if p not in ratios))
    sections = [(report_encoding, (args.images, run_dir))]
    if not args.skip_kv:
        sections.insert(0, (report_kv, (run_dir / "sft" / "hf",)))
    if not args.skip_infer:
        sections.append((report_infer_eval, (run_dir,)))
    failed = 0
    for fn, fargs in sections:  # one failing section does not lose the others' numbers
        try:
            fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - reported, counted, the exit code says so
            failed += 1
            print(f"FAILED {fn.__name__}: {type(exc).__name__}: {exc}")
    if failed:
        raise SystemExit(f"{failed} section(s) failed")


if __name__ == "__main__":
    main()
