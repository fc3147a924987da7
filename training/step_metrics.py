"""Per-step metrics of the GRPO driver: stable names (the MLflow keys) and the console line.

reward/<name>/mean|std for every reward named in rewards.weights (the published four:
format, degradation, understanding, generation; plus any plug-in) and total;
adv/zero_std_fraction; kl, entropy, clip_fraction, grad_norm, lr (learner);
tokens/text, tokens/image, tokens/learner_forward (read by the learner's passes: a shared-prompt
pack reads its prompt once); timing/generate_s, timing/reward_s, timing/learn_s,
timing/sync_s; rollout/tokens_per_s; sync/seconds, sync/gb_per_s; policy/version_lag;
samples/* counts; rewards/nonfinite;
trace/* (per sample, means: response, text and each image span's tokens; the fraction with all
three images drawn at their sizes);
rollout/cfg_twins (classifier-free guidance: unconditional branches started this step, one per
sample and image) and rollout/cfg_unguided_codes (image codes drawn without theirs: 0 unless a
twin fell out of step with its sample; cluster/guidance.py counts them and warns naming the setting
that helps).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from training.step_data import StepResult
from vlcot.trace import IMAGE_STAGES

LEARNER_KEYS = ("kl", "entropy", "clip_fraction", "grad_norm", "lr", "tokens/text", "tokens/image", "ratio_mean",
                "is_weight_mean", "loss/policy", "tokens/learner_forward")


def reward_metric_names(reward_names: Sequence[str]):
    """The reward metric keys a step logs, for these rewards (rewards.weights' keys)."""
    return [f"reward/{c}/{s}" for c in (*reward_names, "total") for s in ("mean", "std")]


def step_metrics(result: StepResult, reward_names: Sequence[str]) -> Dict[str, float]:
    samples, learn, sync = result.samples, result.learn, result.sync
    rewards = [s.reward for s in samples]
    generate_s, reward_s = result.generate_s, result.reward_s
    m: Dict[str, float] = {}
    for comp in reward_names:
        vals = np.array([r.components[comp] for r in rewards]) if rewards else np.zeros(1)
        m[f"reward/{comp}/mean"], m[f"reward/{comp}/std"] = float(vals.mean()), float(vals.std())
    tot = np.array([r.total for r in rewards]) if rewards else np.zeros(1)
    m["reward/total/mean"], m["reward/total/std"] = float(tot.mean()), float(tot.std())
    m["rewards/nonfinite"] = float(sum(len(r.nonfinite) for r in rewards))
    for k in LEARNER_KEYS:
        if k in learn:
            m[k] = float(learn[k])
    gen_tokens = sum(len(s.sample.token_ids) for s in samples)
    m["timing/generate_s"] = generate_s
    m["timing/reward_s"] = reward_s
    m["timing/learn_s"] = float(learn.get("timing/learn_s", 0.0))
    m["timing/sync_s"] = float(sync.get("timing/sync_s", 0.0))
    m["rollout/tokens_per_s"] = gen_tokens / max(generate_s, 1e-9)
    m["rollout/tokens"] = float(gen_tokens)
    m["rollout/truncated_fraction"] = float(np.mean([s.sample.finish_reason == "length" for s in samples])) if samples else 0.0
    m["sync/seconds"] = float(sync.get("sync/seconds", 0.0))
    m["sync/gb_per_s"] = float(sync.get("sync/gb_per_s", 0.0))
    m["samples/count"] = float(len(samples))
    m["samples/prompt_errors"] = float(result.prompt_errors)
    m["samples/strict_format_rate"] = float(np.mean([s.parsed.strict_format for s in samples])) if samples else 0.0
    m.update(trace_metrics(samples))
    m.update(result.batch_metrics)
    return m


def trace_metrics(samples) -> Dict[str, float]:
    """Token counts of the step's traces (means over samples): the whole response, its text, and
    each image span (0 for a sample whose span is missing or malformed), and the fraction of
    samples with all three images at their sizes."""
    if not samples:
        return {}
    m = {"trace/response_tokens": float(np.mean([len(s.sample.token_ids) for s in samples])),
         "trace/text_tokens": float(np.mean([s.parsed.num_text_tokens for s in samples]))}
    for stage in IMAGE_STAGES:
        spans = []
        for s in samples:
            st = s.parsed.stages.get(stage)
            h, w = st.codes.shape if st is not None and st.valid and st.codes is not None else (0, -1)
            spans.append(h * (w + 1) + 4 if h else 0)  # image_start, two grid tokens, rows + newlines, image_end
        m[f"trace/{stage}_tokens"] = float(np.mean(spans))
    m["trace/all_images_fraction"] = float(np.mean([all(s.parsed.stages[k].valid for k in IMAGE_STAGES)
                                                    for s in samples]))
    return m


def step_line(step: int, total: int, m: Dict[str, float]) -> str:
    kl = f"{m['kl']:.4f}" if "kl" in m else "off"  # no reference policy: no KL to report
    parts = " ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in m.items()
                     if k.startswith("reward/") and k.endswith("/mean") and k != "reward/total/mean")
    return (f"step {step}/{total} | reward {m['reward/total/mean']:.3f} ({parts}) | kl {kl} | "
            f"gen {m['timing/generate_s']:.1f}s rew {m['timing/reward_s']:.1f}s learn {m['timing/learn_s']:.1f}s "
            f"sync {m['timing/sync_s']:.2f}s | lag {m['policy/version_lag']:.1f}")
