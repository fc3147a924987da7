"""Peak receiver memory during a weight update, against the model's size, in the same run:
the streamed receive (each tensor loaded as its bucket arrives, as the rollout workers do now)
against materialising every received tensor first (`list(stream)`, what the vLLM engine did).

Sender and receiver are separate processes (learner rank 0 and a rollout worker), joined by the
real transport (gloo here, NCCL on GPUs). The receiver holds the policy (imported from a
released-layout fixture) and copies each received tensor into it, as `HFEngine.update_weights`
does. Memory is the receiver's anonymous resident memory (RssAnon) sampled every 2 ms, above
its value before the update; the transport's own count of live buckets is printed beside it.

    .venv/bin/python bench/weight_update_memory.py [--hidden 512] [--layers 8] [--bucket-mb 32]
"""

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.import_policy import PeakAnon, _anon_mb  # noqa: E402
from comm.transport import WeightTransport, free_port  # noqa: E402


def receiver(policy_dir: str, port: int, modes, q) -> None:
    from vlcot.policy import load_policy

    params = dict(load_policy(policy_dir).model.named_parameters())
    t = WeightTransport("127.0.0.1", port, 1, 2)
    for mode in modes:
        base = _anon_mb()
        with PeakAnon() as mem, torch.no_grad():
            _, stream = t.receive()
            items = list(stream) if mode == "materialised" else stream
            for name, x in items:
                params[name].copy_(x)
            del items
        q.put((mode, mem.peak - base, stream.peak_live_buckets, stream.peak_live_bytes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bucket-mb", type=int, default=32)
    args = ap.parse_args()
    from tests.released_checkpoint import write_released_checkpoint
    from vlcot.importer import import_policy
    from vlcot.policy import load_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench-wum-"))
    try:
        src = write_released_checkpoint(tmp / "released", hidden=args.hidden, heads=args.hidden // 64,
                                        layers=args.layers, intermediate=args.hidden * 11 // 4)
        import_policy(src, tmp / "policy")
        named = list(load_policy(tmp / "policy").model.named_parameters())
        model_bytes = sum(p.numel() * p.element_size() for _, p in named)
        metas = [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in named]
        modes = ["streamed", "materialised", "streamed"]
        port = free_port()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=receiver, args=(str(tmp / "policy"), port, modes, q))
        proc.start()
        sender = WeightTransport("127.0.0.1", port, 0, 2)
        results = []
        for v, _ in enumerate(modes):
            stats = sender.send(metas, (p.detach() for _, p in named), v, args.bucket_mb << 20)
            results.append(q.get())
        proc.join()
        mb = lambda b: b / 2**20  # noqa: E741
        print(f"policy {mb(model_bytes):.0f} MB fp32 ({len(named)} tensors), {stats.buckets} buckets of <= "
              f"{args.bucket_mb} MB (a tensor larger than that gets its own)")
        by = {}
        for mode, peak, live, live_bytes in results:
            by.setdefault(mode, []).append(peak)
            print(f"  {mode:12s}: receiver peak +{peak:.0f} MB = {peak * 2**20 / model_bytes:.2f}x the model; "
                  f"at most {live} buckets ({mb(live_bytes):.0f} MB) alive at once")
        s, m = min(by["streamed"]), by["materialised"][0]
        print(f"ratio: streamed receive peaks at {s / m:.2f}x the materialised one "
              f"({s * 2**20 / model_bytes:.2f}x vs {m * 2**20 / model_bytes:.2f}x the model's size)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
