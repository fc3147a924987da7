"""`import-policy` speed and memory on a released-layout checkpoint of a few hundred MB, against a
plain safetensors copy of the same files (read each shard whole, write it back) in the same run.

Each measurement runs in a fresh process with its libraries already imported. Memory is the
peak of the process's anonymous resident memory (RssAnon, sampled every 2 ms) above its value
before the work: file pages that safetensors maps are not counted, allocations are.

    .venv/bin/python bench/import_policy.py [--hidden 512] [--layers 8] [--shard-mb 64]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakAnon:
    """Samples RssAnon in a thread; `.peak` is the highest value seen."""

    def __init__(self):
        self.peak, self._stop = _anon_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_mb())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _anon_mb())


def child(mode: str, src: str, out: str, shard_mb: int) -> None:
    import transformers  # noqa: F401  (every import before the baseline)
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedTokenizerFast  # noqa: F401
    from transformers.models.chameleon import modeling_chameleon  # noqa: F401

    import vlcot.policy  # noqa: F401
    from vlcot.importer import import_policy
    from vlcot.shards import shard_files

    base = _anon_mb()
    t0 = time.perf_counter()
    with PeakAnon() as mem:
        if mode == "import":
            report = import_policy(src, out, max_shard_bytes=shard_mb << 20)
            nbytes, checks = report.bytes, report.check_seconds
        else:  # the plain copy: each shard read whole and written back
            nbytes, checks = 0, 0.0
            Path(out).mkdir()
            for f in shard_files(src):
                sd = load_file(str(f))
                save_file(sd, str(Path(out) / f.name))
                nbytes += sum(t.numel() * t.element_size() for t in sd.values())
                del sd
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "check_seconds": checks, "bytes": nbytes, "peak_above_base_mb": mem.peak - base}))


def run(mode: str, src: Path, out: Path, shard_mb: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(out), str(shard_mb)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, src, out, shard_mb = args.child
        return child(mode, src, out, int(shard_mb))

    from tests.released_checkpoint import write_released_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        src = write_released_checkpoint(tmp / "released", hidden=args.hidden, heads=args.hidden // 64,
                                        layers=args.layers, intermediate=args.hidden * 11 // 4, shards=args.shards)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        read = run("copy", src, tmp / "copied", args.shard_mb)
        imp = run("import", src, tmp / "imported", args.shard_mb)
        gbs = lambda r: r["bytes"] / 1e9 / r["seconds"]  # noqa: E731
        print(f"released-layout fixture: {size / 1e6:.0f} MB in {args.shards} shards "
              f"(hidden {args.hidden}, {args.layers} layers, vocab 73,728, bf16)")
        print(f"plain safetensors copy : {gbs(read):.2f} GB/s, peak anonymous memory +{read['peak_above_base_mb']:.0f} MB")
        stream = imp["bytes"] / 1e9 / (imp["seconds"] - imp["check_seconds"])
        print(f"import-policy          : {gbs(imp):.2f} GB/s overall ({imp['check_seconds']:.2f}s of checks before "
              f"writing, a fixed cost; {stream:.2f} GB/s while converting), peak anonymous memory "
              f"+{imp['peak_above_base_mb']:.0f} MB (output shards of {args.shard_mb} MB)")
        print(f"ratio: converting streams at {stream / gbs(read):.2f}x the plain copy's speed (overall "
              f"{gbs(imp) / gbs(read):.2f}x); import memory is {imp['peak_above_base_mb'] / (size / 2**20):.2f}x the "
              f"checkpoint's size (the plain copy, all file-mapped, allocates "
              f"{read['peak_above_base_mb']:.0f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
