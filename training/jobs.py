"""Jobs the CLI runs: the pieces every job needs (data, initial policy, VQ, Ray) and SFT."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from cluster.config import Config
from learner.sft import build_sft_examples, run_sft
from vlcot.config import VQCheckpointError
from vlcot.data import prepare_data
from vlcot.errors import BadPath
from vlcot.manifest import ManifestRecord, manifest_path, read_manifest
from vlcot.prompt_cache import CACHE_DIR, cached_prompt_codes
from vlcot.released_layout import write_released_checkpoint
from vlcot.trace import build_prompt

log = logging.getLogger(__name__)


def ensure_data(cfg: Config) -> Path:
    """The manifest, prepared from `data` config if it does not exist yet."""
    manifest = manifest_path(cfg.data)
    if not manifest.is_file():
        summary = prepare_data(cfg.image, cfg.degradation, cfg.data, progress=False)
        print(summary.render())
    return manifest


MANIFEST_ROLES = {"sft": "data.sft_manifest", "rl": "data.rl_manifest"}


def manifest_for(cfg: Config, role: str) -> Path:
    """The manifest of one training set: `data.sft_manifest` (cold-start SFT) or
    `data.rl_manifest` (GRPO prompts) when set, else the manifest `ensure_data` gives."""
    key = MANIFEST_ROLES[role]
    path = getattr(cfg.data, key.split(".")[1])
    if not path:
        return ensure_data(cfg)
    if not Path(path).is_file():
        raise BadPath(f"{key} {path} is not a file: give a manifest that `realsr-r1 prepare-data` wrote "
                      f"(data.manifest / data.output_dir), or leave {key} empty to use data.manifest")
    return Path(path)


def training_records(cfg: Config, role: str) -> Tuple[Path, List[ManifestRecord]]:
    """(manifest, its records) of one training set, checked before any actor starts: a missing,
    malformed or empty manifest is a UserError naming it."""
    manifest = manifest_for(cfg, role)
    key = MANIFEST_ROLES[role] if getattr(cfg.data, MANIFEST_ROLES[role].split(".")[1]) else "data.manifest"
    records = read_manifest(manifest, key)
    if not records:
        raise BadPath(f"{key} {manifest} is empty: nothing to train on; give a manifest that `realsr-r1 "
                      "prepare-data` wrote")
    return manifest, records


def encode_prompts(records: List[ManifestRecord], vq, image_cfg, codec, layout, manifest: Path) -> List[List[int]]:
    """The policy's prompt token ids for the records of `manifest`: each LR image, encoded by the
    VQ tokenizer at `image.prompt_size`, in the prompt template. The codes come from the
    manifest's prompt-code cache (vlcot/prompt_cache.py), so a start or a resume encodes only
    images it has not seen. An unreadable LR is an error naming the file (a manifest is written
    by prepare-data, so damage should not pass)."""
    t0 = time.perf_counter()
    codes, encoded = cached_prompt_codes([rec.lr_path for rec in records], vq, image_cfg.prompt_size,
                                         Path(manifest).parent / CACHE_DIR)
    ids = [build_prompt(c, codec, layout) for c in codes]
    log.info("prompts: %d from %s (%d encoded now, %d from the cache) in %.1fs", len(ids), manifest, encoded,
             len(ids) - encoded, time.perf_counter() - t0)
    return ids


def ensure_policy_dir(cfg: Config) -> Path:
    """The starting policy as an HF-layout directory every actor can load: the configured
    checkpoint, or one built from config once under run_dir (`policy.init`)."""
    if cfg.policy.checkpoint:
        return Path(cfg.policy.checkpoint)
    out = Path(cfg.run_dir) / "policy_init"
    if not (out / "config.json").is_file():
        build_initial_policy(cfg, out)
    return out


def build_initial_policy(cfg: Config, out: Path) -> str:
    """Write the policy `policy.init` names into `out`; returns a line saying what was written.
    released-layout: the released PURE layout at policy.model's width and depth is written
    beside `out` (<out>-released) and converted into `out` by the importer."""
    if cfg.policy.init == "released-layout":
        from vlcot.importer import import_policy  # local: transformers, only for this kind of policy

        m = cfg.policy.model
        src = write_released_checkpoint(out.parent / f"{out.name}-released", hidden=m.hidden_size,
                                        heads=m.num_attention_heads, layers=m.num_hidden_layers,
                                        intermediate=m.intermediate_size, seed=cfg.seed,
                                        max_position_embeddings=m.max_position_embeddings)
        report = import_policy(src, out, codebook_size=cfg.vq.codebook_size,
                               max_grid=cfg.policy.special_tokens.max_grid, patch_px=cfg.image.patch_px)
        return f"released-layout policy written to {src} and imported into {out}: {report.render().splitlines()[0]}"
    from vlcot.policy import build_tiny_policy  # local: transformers, only to build a policy

    policy = build_tiny_policy(cfg.policy, cfg.image, cfg.vq)
    policy.save(out)
    return f"policy -> {out}  ({sum(p.numel() for p in policy.model.parameters()):,} params)"


def ensure_vq_dir(cfg: Config) -> Path:
    """The run's VQ tokenizer as a directory every actor can load: the configured one (`vq.*`),
    saved under run_dir once. A run_dir that already holds a different tokenizer is an error:
    the policy's image codes mean something only to the tokenizer they were learned with."""
    import torch

    from vlcot.vq import VQTokenizer, vq_from_config  # local: diffusers, only where a run needs its VQ

    out = Path(cfg.run_dir) / "vq"
    configured = vq_from_config(cfg.vq)
    if not (out / "vq_config.json").is_file():
        configured.save(out)
        return out
    saved = VQTokenizer.load(out).state_dict()
    mine = configured.state_dict()
    if saved.keys() != mine.keys() or any(not torch.equal(saved[k], mine[k]) for k in mine):
        source = f"vq.checkpoint={cfg.vq.checkpoint}" if cfg.vq.checkpoint else f"a random tokenizer (vq.seed={cfg.vq.seed})"
        raise VQCheckpointError(f"{out} holds another VQ tokenizer than the configured one ({source}); the policy's "
                                f"image codes belong to the tokenizer they were learned with: use a new run_dir or delete {out}")
    return out


def required_cpus(cfg: Config) -> int:
    """Logical CPUs the configured actors ask for (learner ranks, rollout workers, reward workers)."""
    return math.ceil(cfg.learner.num_workers * cfg.learner.num_cpus + cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
                     + cfg.rewards.num_workers * cfg.rewards.num_cpus)


_PRIVATE_RAY: Optional[str] = None  # GCS address of the local Ray start_ray started in this process


def start_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster this job was submitted to (RAY_ADDRESS, set by `ray job submit`),
    else start a private local one. A local one advertises at least `num_cpus` logical
    CPUs: on a small machine the actors time-share the cores instead of waiting forever.
    A private Ray that an earlier job of this process started too small is restarted bigger
    (its jobs have shut their actors down); a smaller cluster we joined gets a warning, since
    the actors will wait until it grows."""
    import ray  # local: Ray, only for the jobs that start actors

    global _PRIVATE_RAY
    need = num_cpus or 0
    if ray.is_initialized():
        have = ray.cluster_resources().get("CPU", 0)
        if have >= need:
            return
        if ray.get_runtime_context().gcs_address != _PRIVATE_RAY:
            log.warning("the Ray cluster advertises %g CPUs, this job's actors ask for %d: they wait until it grows",
                        have, need)
            return
        log.warning("restarting this process's local Ray: it has %g CPUs, this job asks for %d", have, need)
        ray.shutdown()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
        _PRIVATE_RAY = ray.get_runtime_context().gcs_address


@dataclass
class SFTResult:
    history: List[Dict[str, float]]  # per-step metrics
    examples: int  # traces trained on
    skipped: List[str]  # records that gave no trace, with the reason


def cold_start_sft(group, records: List[ManifestRecord], vq, meta, cfg: Config,
                   on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> SFTResult:
    """The one SFT path (`realsr-r1 sft` and the driver's cold start): manifest records -> VLCoT
    traces in the policy's conversation format -> `cfg.learner.sft.steps` steps on the learner
    group."""
    prompts, responses, skipped = build_sft_examples(records, vq, meta.codec, meta.layout, cfg.image)
    history = run_sft(group, prompts, responses, cfg.learner.sft, pad_id=meta.tokenizer.pad_token_id or 0,
                      image_ids=meta.layout.image_span_ids(), seed=cfg.seed, on_step=on_step)
    return SFTResult(history, len(prompts), skipped)


def run_sft_job(cfg: Config, out_dir: Optional[Path] = None, progress: bool = True) -> Dict[str, object]:
    """`realsr-r1 sft`: manifest -> VLCoT traces -> SFT on the learner group -> checkpoint.
    Returns {"checkpoint": dir with hf/ ds/ learner_state.json, "history": per-step metrics}."""
    from tqdm import tqdm

    from cluster.learner_group import LearnerGroup  # local: Ray, as in start_ray
    from vlcot.policy import load_policy_meta  # local: transformers and diffusers, as above
    from vlcot.vq import VQTokenizer

    manifest, records = training_records(cfg, "sft")  # every input checked before Ray starts
    policy_dir = ensure_policy_dir(cfg)
    vq = VQTokenizer.load(ensure_vq_dir(cfg))
    meta = load_policy_meta(policy_dir, cfg.policy, cfg.image, cfg.vq)  # no weights: only the format is needed here
    start_ray(max(2, cfg.learner.num_workers))
    group = LearnerGroup(cfg.learner, str(policy_dir))
    bar = tqdm(total=cfg.learner.sft.steps, desc="sft", disable=not progress)
    history: List[Dict[str, float]] = []

    def on_step(step: int, m: Dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss/sft']:.3f}")
        if (step + 1) % cfg.learner.sft.log_every == 0 or step == 0:
            tqdm.write(f"sft step {step + 1}: loss {m['loss/sft']:.4f}  grad_norm {m['grad_norm']:.3f}  "
                       f"{m['timing/step_s']:.2f}s")

    try:
        result = cold_start_sft(group, records, vq, meta, cfg, on_step)
        history = result.history
        print(f"sft: {result.examples} examples from {manifest}"
              + (f", {len(result.skipped)} skipped" if result.skipped else ""))
        out = Path(out_dir) if out_dir else Path(cfg.run_dir) / "sft"
        group.save(str(out), {"phase": "sft", "examples": result.examples})
    finally:
        bar.close()
        group.shutdown()
    return {"checkpoint": out, "history": history}
