"""GPU smoke check that a bare GPU machine can run (no vllm, ray, deepspeed, omegaconf, network).

    python3 bench/gpu_smoke.py            # one H100/H200: a 7B-shaped policy, under 8 minutes
    python3 bench/gpu_smoke.py --cpu      # the same stages at a tiny shape, well under a minute

Stages, each timed and guarded (a failed stage is recorded and the others still run):
  build    a Chameleon-7B-shaped `UnmaskedChameleonForConditionalGeneration` (32 layers x 4096,
           32 heads, intermediate 11008, vocab 73,728), random bf16 weights created on the
           device (never an fp32 copy), with the released token layout (image codes on ids
           4-8195 and 65536-73727, image start 8197, REAL-CHECKPOINT.md);
  decode   the HF engine (rollout/hf_engine.py with rollout/rules.py: span rules, adaptive
           top-k, classifier-free guidance 0.8 with its unconditional branch) draws the final
           64x64-code image (64*65+4 = 4,164 tokens) after a prompt that holds the LR, rough and
           middle images: tokens/s and host syncs per decode step;
  learner  one GRPO log-prob + backward over a 10k-token trace (learner/logprobs.py chunked
           log-probs, gradient checkpointing, learner/grpo.py clipped loss with truncated IS
           weights): peak memory against an estimate for this shape (full model, one GPU,
           no ZeRO, no optimizer);
  vq       the VQ decoder (vlcot/vq.py, LlamaGen VQ_8 architecture, random weights) at 512 px:
           the drawn image, then images/s at a batch.
It prints one block of numbers and writes them as JSON to --out (default $OUT/gpu_smoke.json,
else ./gpu_smoke.json) after every stage; it exits 1 naming the failed stages. docs/gpu.md says
how to run it on a machine without the project's environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._smoke import (  # noqa: E402
    ABSENT_ON_GPU, CPU, END_TOKEN, GPU, PAD, StageError, SyncCounter, _gb, _sync, build_policy, failure,
    learner_trace, memory_estimate, released_layout, trace_prefix,
)


# ---- stages ---------------------------------------------------------------------------------
def stage_build(ctx: dict) -> dict:
    shape, device = ctx["shape"], ctx["device"]
    ctx["layout"] = layout = released_layout()
    torch.manual_seed(0)
    model = build_policy(shape, layout, device)
    _sync(device)
    ctx["model"] = model
    n = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    rec = {"params": n, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device), "param_gb": _gb(2 * n),
           "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab}
    if device.type == "cuda":
        rec["allocated_gb"] = _gb(torch.cuda.memory_allocated(device))
    return rec


def stage_decode(ctx: dict) -> dict:
    from rollout.config import RolloutConfig, SamplingConfig
    from rollout.engine import RolloutEngine
    from rollout.hf_engine import HFEngine
    from rollout.rules import Masks, SpanRules
    from vlcot.config import ImageConfig
    from vlcot.layout import span_length

    shape, device, model, layout = ctx["shape"], ctx["device"], ctx.get("model"), ctx.get("layout")
    if model is None:
        raise StageError("needs the policy (the build stage failed)")
    side = shape.hr_size // 8
    span = span_length(side, side)
    sampling = SamplingConfig(temperature=0.9, image_temperature=0.9, text_greedy=True, cfg_scale=0.8,
                              max_new_tokens=span - 1)  # the prompt ends in image_start: the rest of the span
    cfg = RolloutConfig(engine="hf", group_size=shape.samples, max_model_len=shape.max_model_len, sampling=sampling)
    image_cfg = ImageConfig(hr_size=shape.hr_size, lr_size=shape.hr_size // 4, prompt_size=shape.decode_lr_px)

    class InMemoryHFEngine(HFEngine):
        """HFEngine around a model already on the device (HFEngine.__init__ reads a folder:
        14 GB of random weights would only be written to be read back)."""

        def __init__(self):
            self.model, self.device = model.eval(), device
            rules = SpanRules.build(layout, image_cfg, cfg.sampling, model.config.vocab_size)
            RolloutEngine.__init__(self, cfg, rules, layout, END_TOKEN)
            self.masks = Masks(rules, device)
            self.pad_id = PAD

    engine = InMemoryHFEngine()
    prompt = trace_prefix(layout, engine.rules, np.random.default_rng(0), shape.decode_lr_px)
    counter = SyncCounter(cuda_only=device.type == "cuda")
    state = {"forwards": 0, "t0": 0.0, "debug_syncs_model": 0, "debug_syncs_rules": 0}
    deadline = [0.0]

    def pre(*_):
        if time.perf_counter() > deadline[0]:
            raise StageError("over budget")
        counter.depth += 1
        state["forwards"] += 1

    def post(*_):
        counter.depth -= 1

    def on_warning(message, *_a, **_k):
        if "synchroniz" in str(message):  # torch: "called a synchronizing CUDA operation"
            state["debug_syncs_model" if counter.depth else "debug_syncs_rules"] += 1

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings(), counter:
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            state["t0"] = time.perf_counter()
            deadline[0] = state["t0"] + shape.decode_budget_s
            try:
                result = engine.generate([prompt], n=shape.samples, seed=0)[0]
                _sync(device)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
    except StageError as exc:
        dt = time.perf_counter() - state["t0"]
        steps = state["forwards"] / 2  # a conditional and an unconditional forward per step
        raise StageError(f"decode passed its budget of {shape.decode_budget_s:.0f} s after ~{steps:.0f} of {span - 1} "
                         f"steps (~{steps * shape.samples / dt:.1f} tokens/s); raise --decode-budget-s",
                         {"tokens_per_s_so_far": steps * shape.samples / dt, "steps_so_far": steps}) from None
    finally:
        for h in hooks:
            h.remove()
    dt = time.perf_counter() - state["t0"]
    if not isinstance(result, list):
        raise StageError(f"the engine refused the prompt: {result.reason}")
    generated = [len(s.token_ids) for s in result]
    steps = max(generated)
    codes, why = layout.parse_image_span([layout.image_start] + result[0].token_ids)
    if codes is None:
        raise StageError(f"the drawn image span does not parse: {why}")
    ctx["codes"] = codes
    rec = {"prompt_tokens": len(prompt), "samples": shape.samples, "generated_tokens": sum(generated),
           "image_span_tokens": 1 + generated[0], "expected_span_tokens": span, "codes_shape": list(codes.shape),
           "distinct_codes": int(len(np.unique(codes))), "seconds_decode": round(dt, 3),
           "tokens_per_s": sum(generated) / dt, "steps": steps, "forwards": state["forwards"],
           "cfg_twins": engine.throughput.cfg_twins, "cfg_unguided_codes": engine.throughput.cfg_unguided_codes,
           "host_reads_per_step": (counter.model + counter.rules) / steps,
           "host_reads_per_step_rules": counter.rules / steps, "host_reads_per_step_model": counter.model / steps,
           "host_reads_by_method": dict(sorted(counter.by_method.items())),
           "host_reads_counted": "CUDA tensors only" if counter.cuda_only else "every tensor (CPU run)"}
    if device.type == "cuda":  # torch.cuda's sync debug mode also sees syncs inside ops (nonzero, mask indexing)
        rec["syncs_per_step_debug_mode"] = (state["debug_syncs_model"] + state["debug_syncs_rules"]) / steps
        rec["syncs_per_step_debug_mode_rules"] = state["debug_syncs_rules"] / steps
        rec["syncs_per_step_debug_mode_model"] = state["debug_syncs_model"] / steps
    return rec


def stage_learner(ctx: dict) -> dict:
    from learner.grpo import AGGREGATIONS, POLICY_LOSSES, truncated_is_weights
    from learner.logprobs import sequence_logprobs
    from rollout.config import SamplingConfig
    from rollout.rules import SpanRules
    from vlcot.config import ImageConfig

    shape, device, model, layout = ctx["shape"], ctx["device"], ctx.get("model"), ctx.get("layout")
    if model is None:
        raise StageError("needs the policy (the build stage failed)")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the decode stage's KV caches
    rules = SpanRules.build(layout, ImageConfig(hr_size=shape.hr_size), SamplingConfig(), shape.vocab)
    ids, prompt_len = learner_trace(layout, rules, np.random.default_rng(1), shape.trace_lr_px, shape.trace_tokens)
    ids = ids.to(device)
    am = torch.ones_like(ids)
    start = prompt_len - 1  # the first target is the first response token
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t0 = time.perf_counter()
        logp, ent = sequence_logprobs(model, ids, am, start, shape.chunk, 1.0, with_entropy=True)
        _sync(device)
        t1 = time.perf_counter()
        positions = logp.shape[1]
        mask = torch.ones_like(logp)
        old = logp.detach()
        torch.manual_seed(2)
        rollout_logp = old + 0.05 * torch.randn(old.shape, device=old.device)  # vLLM's log-probs differ a little
        is_w = truncated_is_weights(old, rollout_logp, 2.0)
        lm = np.ones((1, positions))
        denom = AGGREGATIONS.get("seq-mean-token-mean").local_denominator(lm, lm, positions)
        adv = torch.ones(1, device=device)  # one std above its group's mean
        loss, stats = POLICY_LOSSES.get("clipped")(logp, old, adv, mask, 0.2, 0.28, "seq-mean-token-mean", None,
                                                    is_w, denom, positions)
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if device.type == "cuda":  # read before the norm below allocates anything
            peak, source = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
        else:
            peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (ru_maxrss)"
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # one fp32 scalar each, no fp32 copies
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        grad_norm = float(torch.linalg.vector_norm(norms))
        n = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        est = memory_estimate(shape, n, trainable, positions)
        return {
            "trace_tokens": int(ids.shape[1]), "prompt_tokens": prompt_len, "scored_positions": positions,
            "chunk": shape.chunk, "chunks": math.ceil(positions / shape.chunk),
            "gradient_checkpointing": bool(model.is_gradient_checkpointing),
            "loss": float(loss.detach()), "grad_norm": grad_norm, "params_with_grad": len(grads),
            "entropy_mean": float((ent * mask).sum() / mask.sum()), "ratio_mean": float(stats["ratio_mean"]),
            "seconds_logprobs": round(t1 - t0, 3), "seconds_backward": round(t2 - t1, 3),
            "tokens_per_s": ids.shape[1] / (t2 - t0),
            "peak_memory_gb": _gb(peak), "peak_memory_source": source, "allocated_before_gb": _gb(base),
            "estimate_gb": {k: _gb(v) for k, v in est.items()},
            "peak_over_estimate": peak / est["total"] if device.type == "cuda" else None,
        }
    finally:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval()


def stage_vq(ctx: dict) -> dict:
    from vlcot.config import VQConfig
    from vlcot.vq import vq_from_config

    shape, device = ctx["shape"], ctx["device"]
    ctx.pop("model", None)  # the policy is done: free its memory for the decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vq = vq_from_config(VQConfig(checkpoint=shape.vq)).to(device).eval()
    side = shape.hr_size // 8
    rec = {"vq": shape.vq or "random LlamaGen VQ_8", "dtype": str(vq.codebook.weight.dtype).replace("torch.", ""),
           "params": sum(p.numel() for p in vq.parameters()), "side_px": shape.hr_size}
    g = torch.Generator(device="cpu").manual_seed(0)
    codes = torch.randint(0, vq.cfg.codebook_size, (shape.vq_batch, side, side), generator=g).to(device)
    out = vq.decode(codes)  # warm-up (cuDNN picks its algorithms)
    _sync(device)
    rounds, t0 = 3, time.perf_counter()
    for _ in range(rounds):
        out = vq.decode(codes)
    _sync(device)
    dt = (time.perf_counter() - t0) / rounds
    rec.update(batch=shape.vq_batch, decoded_shape=list(out.shape), seconds_per_batch=round(dt, 4),
               images_per_s=shape.vq_batch / dt, pixel_range=[float(out.min()), float(out.max())])
    if ctx.get("codes") is not None:  # the drawn image, decoded as the reward worker does it (codes on the CPU)
        try:
            img = vq.decode(torch.as_tensor(ctx["codes"])[None])
            _sync(device)
        except Exception as exc:
            raise StageError(f"decoding the drawn image (CPU codes, as rewards/plugins.py does) failed: {exc}", rec)
        rec.update(drawn_image_shape=list(img.shape), drawn_image_finite=bool(torch.isfinite(img).all()))
    return rec


STAGES = (("build", stage_build), ("decode", stage_decode), ("learner", stage_learner), ("vq", stage_vq))


# ---- driver ---------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=_gb(props.total_memory), capability=f"{props.major}.{props.minor}")
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None  # the vq stage will say how to bring it (docs/gpu.md)
    return env


def run_stage(name: str, fn: Callable[[dict], dict], ctx: dict, results: dict, out: Path) -> None:
    t0 = time.perf_counter()
    try:
        rec = dict(fn(ctx), ok=True)
    except Exception as exc:  # every stage is guarded: record why, go on with the next
        rec = dict(getattr(exc, "partial", {}), ok=False, **failure(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    results["stages"][name] = rec
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")  # after every stage: a timeout keeps the rest


def summary(results: dict) -> str:
    env, st = results["env"], results["stages"]
    lines = [f"realsr-r1 GPU smoke ({results['mode']}: {env.get('gpu', env['device'])}, torch {env['torch']}, "
             f"transformers {env['transformers']}, python {env['python']})"]

    def line(name: str, text: Callable[[dict], str]) -> None:
        r = st.get(name)
        if r is None:
            return
        body = text(r) if r["ok"] else r["error"]
        lines.append(f"  {name:<8} {'ok' if r['ok'] else 'FAILED':<6} {r['seconds']:8.1f} s  {body}")

    line("build", lambda r: f"{r['params'] / 1e9:.3f} B params, {r['dtype']} on {r['device']} ({r['param_gb']} GB)")
    line("decode", lambda r: (
        f"{r['image_span_tokens']:,}-token {r['codes_shape'][0]}x{r['codes_shape'][1]} image after a "
        f"{r['prompt_tokens']:,}-token prompt, CFG: {r['tokens_per_s']:.1f} tokens/s; host reads/step "
        f"{r['host_reads_per_step']:.1f} (rules {r['host_reads_per_step_rules']:.1f}, model "
        f"{r['host_reads_per_step_model']:.1f})"
        + (f", syncs/step (sync debug mode) {r['syncs_per_step_debug_mode']:.1f} (rules "
           f"{r['syncs_per_step_debug_mode_rules']:.1f})" if "syncs_per_step_debug_mode" in r else "")))
    line("learner", lambda r: (
        f"{r['trace_tokens']:,}-token trace ({r['scored_positions']:,} scored, {r['chunks']} chunks): log-probs "
        f"{r['seconds_logprobs']:.2f} s, backward {r['seconds_backward']:.2f} s, loss {r['loss']:.4f}, grad norm "
        f"{r['grad_norm']:.4g}; peak {r['peak_memory_gb']} GB ({r['peak_memory_source']}) vs estimate "
        f"{r['estimate_gb']['total']} GB"
        + (f" = {r['peak_over_estimate']:.2f}x" if r["peak_over_estimate"] is not None else "")))
    line("vq", lambda r: (f"{r['vq']} at {r['side_px']} px: {r['images_per_s']:.2f} images/s (batch {r['batch']}), "
                          f"decoded {r['decoded_shape']}"))
    if results["failed"]:
        lines.append(f"FAILED stages: {', '.join(results['failed'])} (errors above; tracebacks in the JSON)")
    if results["absent_on_gpu_imported"]:
        lines.append(f"imported packages the GPU machine lacks: {results['absent_on_gpu_imported']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shape on the CPU (what tests/test_gpu_smoke.py runs)")
    ap.add_argument("--out", default="", help="JSON path (default $OUT/gpu_smoke.json, else ./gpu_smoke.json)")
    ap.add_argument("--samples", type=int, default=0, help="samples drawn together (default 1)")
    ap.add_argument("--decode-budget-s", type=float, default=0.0, help="stop the decode stage after this long")
    ap.add_argument("--trace-tokens", type=int, default=0, help="learner trace length (default 10,000; --cpu 512)")
    ap.add_argument("--stages", default=",".join(n for n, _ in STAGES), help="comma-separated subset to run")
    args = ap.parse_args(argv)
    shape = CPU if args.cpu else GPU
    shape = replace(shape, samples=args.samples or shape.samples, trace_tokens=args.trace_tokens or shape.trace_tokens,
                    decode_budget_s=args.decode_budget_s or shape.decode_budget_s)
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_smoke: no usable CUDA device (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}). Check nvidia-smi and that the driver "
              "supports this CUDA version, or run --cpu for the tiny shape.", file=sys.stderr)
        return 2
    out = Path(args.out or Path(os.environ.get("OUT") or ".") / "gpu_smoke.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"mode": "cpu" if args.cpu else "gpu", "shape": asdict(shape), "env": environment(device),
               "stages": {}, "failed": [], "absent_on_gpu_imported": []}
    ctx = {"shape": shape, "device": device}
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {n for n, _ in STAGES})
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {[n for n, _ in STAGES]}")
    t0 = time.perf_counter()
    for name, fn in STAGES:
        if name in wanted:
            run_stage(name, fn, ctx, results, out)
    results["seconds_total"] = round(time.perf_counter() - t0, 3)
    results["failed"] = [n for n, r in results["stages"].items() if not r["ok"]]
    results["absent_on_gpu_imported"] = sorted(m for m in ABSENT_ON_GPU if m in sys.modules)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(summary(results))
    print(f"total {results['seconds_total']:.1f} s; JSON -> {out}")
    if results["failed"] or results["absent_on_gpu_imported"]:
        what = ", ".join(results["failed"] + results["absent_on_gpu_imported"])
        print(f"gpu_smoke: FAILED ({what})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
