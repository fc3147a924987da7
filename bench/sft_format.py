"""Cold-start SFT of the tiny config, judged on greedy generations of the training prompts:
how many steps until >= 90% pass the published strict format check, and whether the images
they draw are the pictures SFT taught (not noise): the Y-PSNR of the decoded final image to
its HR, against the PSNR of the VQ's own reconstruction of that HR (goal: within 3 dB), and
against bicubic x4 of the LR it was given. Also how long it takes on this machine.

Trains on the built-in set as the config prepares it (88 traces by default: 8 degradation
draws of 11 photographs) with the real learner group (2 ZeRO-2 CPU ranks),
and every `--eval-every` steps greedily generates one response per prompt with HF
transformers (no decoding constraints: the policy alone must write the structure). Runs
`--max-steps`, or stops at 90% strict format with `--stop-at-format`.

    .venv/bin/python bench/sft_format.py [--max-steps 600] [--eval-every 50] [--stop-at-format] [key=value ...]
"""

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import load_config  # noqa: E402
from vlcot.fidelity import psnr_y  # noqa: E402
from training.jobs import ensure_data, ensure_policy_dir, ensure_vq_dir, start_ray  # noqa: E402
from cluster.learner_group import LearnerGroup  # noqa: E402
from learner.sft import build_sft_examples, run_sft  # noqa: E402
from vlcot.manifest import read_manifest  # noqa: E402
from vlcot.images import open_image  # noqa: E402
from vlcot.policy import load_policy  # noqa: E402
from vlcot.trace import parse_response  # noqa: E402
from vlcot.vq import VQTokenizer  # noqa: E402
from vlcot.vq_train import reconstruction_psnr  # noqa: E402


@torch.no_grad()
def judge(policy, vq, state, prompts, responses, hrs, hr_size):
    """(strict-format rate, all-stages-valid rate, mean Y-PSNR of valid final images to their HR)."""
    policy.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    ok, valid, psnrs = 0, 0, []
    for p, r, hr in zip(prompts, responses, hrs):
        out = policy.model.generate(torch.tensor([p]), max_new_tokens=len(r) + 32, do_sample=False,
                                    eos_token_id=policy.codec.end_token_id, pad_token_id=policy.tokenizer.pad_token_id)
        parsed = parse_response(out[0, len(p):].tolist(), policy.codec, policy.layout, hr_size=hr_size)
        ok += parsed.strict_format
        valid += parsed.valid
        final = parsed.stages["final_image"]
        if final.valid:
            psnrs.append(psnr_y(np.asarray(vq.decode_images(final.codes[None])[0]), hr))
    return ok / len(prompts), valid / len(prompts), (float(np.mean(psnrs)) if psnrs else float("nan")), len(psnrs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=None, help="default: learner.sft.steps of the config")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--stop-at-format", action="store_true", help="stop at >= 90%% strict format")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(overrides=["run_dir=runs/bench-sft", "data.output_dir=runs/bench-sft/data", *args.overrides])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh policy, data and tokenizer copy every time
    max_steps = args.max_steps or cfg.learner.sft.steps
    torch.set_num_threads(1)
    policy = load_policy(ensure_policy_dir(cfg), cfg.policy, cfg.image, cfg.vq)
    vq = VQTokenizer.load(ensure_vq_dir(cfg))
    records = read_manifest(ensure_data(cfg))
    prompts, responses, skipped = build_sft_examples(records, vq, policy.codec, policy.layout, cfg.image)
    assert not skipped, skipped
    hrs = [np.asarray(open_image(r.hr_path)[0]) for r in records]
    lrs = [open_image(r.lr_path)[0] for r in records]
    size = cfg.image.hr_size
    vq_psnr = float(np.mean([reconstruction_psnr(vq, Image.fromarray(h)) for h in hrs]))
    bicubic = float(np.mean([psnr_y(np.asarray(lr.resize((size, size), Image.BICUBIC)), h) for lr, h in zip(lrs, hrs)]))
    print(f"{len(prompts)} traces, response length {np.mean([len(r) for r in responses]):.0f} tokens; "
          f"lr {cfg.learner.sft.lr}, batch {cfg.learner.sft.batch_size}, {cfg.learner.num_workers} ZeRO-{cfg.learner.zero_stage} ranks; "
          f"vq {cfg.vq.checkpoint or 'random'}")
    print(f"final image Y-PSNR to HR: VQ reconstruction of the HR {vq_psnr:.2f} dB, bicubic x{size // cfg.image.lr_size} "
          f"of the LR {bicubic:.2f} dB")
    start_ray(max(2, cfg.learner.num_workers))
    group = LearnerGroup(cfg.learner, str(ensure_policy_dir(cfg)))
    sft_cfg = cfg.learner.sft
    sft_cfg.steps = args.eval_every
    train_s, t_start, steps = 0.0, time.perf_counter(), 0
    try:
        while steps < max_steps:
            t0 = time.perf_counter()
            hist = run_sft(group, prompts, responses, sft_cfg, policy.tokenizer.pad_token_id or 0,
                           policy.layout.image_span_ids(), seed=cfg.seed + steps)
            train_s += time.perf_counter() - t0
            steps += args.eval_every
            rate, valid, psnr, n_img = judge(policy, vq, group.full_state_dict(), prompts, responses, hrs, size)
            print(f"step {steps}: sft loss {hist[-1]['loss/sft']:.3f}, strict format {rate:.0%}, all stages valid "
                  f"{valid:.0%}, final image {psnr:.2f} dB over {n_img} ({psnr - vq_psnr:+.2f} dB to the VQ's own), "
                  f"SFT time {train_s:.0f}s, wall {time.perf_counter() - t_start:.0f}s", flush=True)
            if args.stop_at_format and rate >= 0.9:
                break
        print(f"RESULT: after {steps} SFT steps ({train_s:.0f}s, {train_s / steps:.2f} s/step): strict format {rate:.0%}; "
              f"final images {psnr:.2f} dB vs the VQ's reconstruction {vq_psnr:.2f} dB: {psnr - vq_psnr:+.2f} dB "
              f"(goal >= -3.00)")
    finally:
        group.shutdown()


if __name__ == "__main__":
    main()
