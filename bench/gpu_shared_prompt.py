"""Shared-prompt pass vs separate passes on one device, at the 7B shape (torch + transformers only).

The learner bench (bench/shared_prompt_learner.py) needs Ray and DeepSpeed, which the GPU
machine's image lacks; this script times the part the shared-prompt pass changes, the policy's
log-probs and backward over one GRPO group, on a bare machine:

    python3 bench/gpu_shared_prompt.py                    # one H100/H200: Chameleon-7B shape, bf16, G 5 and 8
    python3 bench/gpu_shared_prompt.py --layers 8 --groups 5 8 16
    python3 bench/gpu_shared_prompt.py --cpu              # tiny shape in fp32 (tests/test_gpu_shared_prompt.py)

For each G: G paper-shape traces (the 512-px LR image's 64x64 codes in the prompt, three images
in the response, `--trace-tokens` in all) sharing one prompt. Separate passes: each trace's
chunked log-probs and backward, one after another (micro-batches of one, gradients accumulated).
Shared: one pack (learner/shared_prompt.py), in each of its two attention layouts — `rows` (the
CPU default) and `response_queries` (the CUDA default: the prompt's queries once, the responses'
under SDPA's lower-right causal mask). All with gradient checkpointing, the clipped GRPO loss
(seq-mean-token-mean) and the same advantages. Prints tokens read, seconds, peak memory, and how
far each shared pass's log-probs and gradient norm are from the separate passes'; writes JSON to
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._smoke import CPU, GPU, _gb, _sync, build_policy, failure, learner_trace, released_layout  # noqa: E402

SHARED_LAYOUTS = {"rows": False, "response_queries": True}  # PackSpans' attention layouts (response_queries flag)


def group_rows(layout, shape, g: int, seed: int = 0):
    """[g, L] ids of g traces with one prompt, and the prompt's length."""
    from rollout.config import SamplingConfig
    from rollout.rules import SpanRules
    from vlcot.config import ImageConfig

    rules = SpanRules.build(layout, ImageConfig(hr_size=shape.hr_size), SamplingConfig(), shape.vocab)
    traces = [learner_trace(layout, rules, np.random.default_rng(seed + k), shape.trace_lr_px, shape.trace_tokens)
              for k in range(g)]
    p = traces[0][1]
    rows = torch.stack([torch.cat([traces[0][0][0, :p], ids[0, p:]]) for ids, _ in traces])
    return rows, p


def _loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    from learner.grpo import POLICY_LOSSES

    n = int(mask.shape[0])
    loss, _ = POLICY_LOSSES.get("clipped")(logp, logp.detach(), adv, mask, 0.2, 0.28, "seq-mean-token-mean", None,
                                          None, n, mask.shape[1])
    return loss


def _grad_norm(model) -> float:
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _timed(device, fn) -> Dict[str, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if device.type == "cuda":
        out["peak_memory_gb"] = _gb(torch.cuda.max_memory_allocated(device))
    return out


def compare(model, rows: torch.Tensor, p: int, chunk: int, device) -> Dict[str, object]:
    from learner.logprobs import sequence_logprobs
    from learner.shared_prompt import build_pack, pack_logprobs

    g, length = rows.shape
    cols = length - p  # response targets: columns p - 1 .. L - 2 of the per-target layout, start = p - 1
    adv = torch.linspace(-1.0, 1.0, g, device=device)
    mask = torch.ones(g, cols, device=device)

    def separate():
        logps = []
        for k in range(g):
            ids = rows[k:k + 1].to(device)
            logp, _ = sequence_logprobs(model, ids, torch.ones_like(ids), p - 1, chunk)
            _loss(logp, mask[k:k + 1], adv[k:k + 1]).div(g).backward()  # the group's mean over sequences
            logps.append(logp.detach().float())
        return {"logp": torch.cat(logps), "grad_norm": _grad_norm(model), "tokens": g * length}

    def shared(response_queries: bool):
        def run():
            ids = rows.numpy()
            pack = build_pack(ids, np.ones_like(ids), np.full(g, p), p - 1, device, response_queries)
            logp, _ = pack_logprobs(model, pack, (g, cols), chunk)
            _loss(logp, mask, adv).backward()
            return {"logp": logp.detach().float(), "grad_norm": _grad_norm(model), "tokens": pack.length}

        return run

    res = {}
    for name, fn in (("separate", separate), *((layout, shared(q)) for layout, q in SHARED_LAYOUTS.items())):
        model.zero_grad(set_to_none=True)
        res[name] = _attempt(device, fn)
    want = res["separate"].pop("logp", None)
    for layout in SHARED_LAYOUTS:
        got = res[layout].pop("logp", None)
        if got is None or want is None:
            continue
        diff = (got - want).abs()
        res[layout].update({"logp_max_abs_diff": float(diff.max()), "logp_mean_abs_diff": float(diff.mean()),
                            "grad_norm_rel_diff": abs(res[layout]["grad_norm"] - res["separate"]["grad_norm"])
                            / max(res["separate"]["grad_norm"], 1e-30),
                            "speedup": res["separate"]["seconds"] / res[layout]["seconds"],
                            "token_ratio": res["separate"]["tokens"] / res[layout]["tokens"]})
    return res


def _attempt(device, fn) -> Dict[str, object]:
    """`_timed(device, fn)`, or the error that stopped it: one pass failing (out of memory, a kernel
    the GPU lacks) leaves the others' numbers."""
    try:
        return _timed(device, fn)
    except Exception as exc:  # recorded as a smoke stage is, the run goes on
        return failure(exc)


def _line(name: str, rec: Dict[str, object]) -> str:
    if "error" in rec:
        return f"{name}: {rec['error']}"
    peak = f", peak {rec['peak_memory_gb']} GB" if "peak_memory_gb" in rec else ""
    if "speedup" not in rec:
        return f"{name}: {rec['tokens']:,} tokens, {rec['seconds']:.2f} s{peak}"
    return (f"{name}: {rec['tokens']:,} tokens ({rec['token_ratio']:.2f}x fewer), {rec['seconds']:.2f} s "
            f"({rec['speedup']:.2f}x){peak}; log-prob diff max {rec['logp_max_abs_diff']:.2e}, grad norm rel diff "
            f"{rec['grad_norm_rel_diff']:.2e}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shape in fp32 on the CPU")
    ap.add_argument("--groups", type=int, nargs="+", default=[5, 8], help="G values")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's, 32 at 7B)")
    ap.add_argument("--trace-tokens", type=int, default=0, help="tokens per trace (default 10,000; --cpu 512)")
    ap.add_argument("--out", default="", help="JSON path (default $OUT/gpu_shared_prompt.json, else ./)")
    args = ap.parse_args(argv)
    from learner.shared_prompt import use_pack_attention

    shape = CPU if args.cpu else GPU
    shape = replace(shape, layers=args.layers or shape.layers, trace_tokens=args.trace_tokens or shape.trace_tokens)
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        print("gpu_shared_prompt: no usable CUDA device; run --cpu for the tiny shape", file=sys.stderr)
        return 2
    out = Path(args.out or Path(os.environ.get("OUT") or ".") / "gpu_shared_prompt.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    layout = released_layout()
    torch.manual_seed(0)
    model = build_policy(shape, layout, device, dtype)
    use_pack_attention(model)  # plain SDPA for the separate passes, per-response SDPA for a pack
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).replace("torch.", ""), "layers": shape.layers, "hidden": shape.hidden,
               "trace_tokens": shape.trace_tokens, "groups": {}}
    rows, p = group_rows(layout, shape, 2, seed=99)
    compare(model, rows[:, :p + 256], p, shape.chunk, device)  # warm-up: kernels, allocator, cuBLAS handles
    for g in args.groups:
        rows, p = group_rows(layout, shape, g)
        rec = {"prompt_tokens": p, **compare(model, rows, p, shape.chunk, device)}
        results["groups"][str(g)] = rec
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"G {g:2d} ({p:,}-token prompt, {shape.trace_tokens:,}-token traces): "
              + _line("separate", rec["separate"]), flush=True)
        for name in SHARED_LAYOUTS:
            print("      " + _line(f"shared ({name})", rec[name]), flush=True)
    print(f"JSON -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
