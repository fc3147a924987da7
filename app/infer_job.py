"""`realsr-r1 infer`: find what a checkpoint needs (policy, VQ tokenizer, its run's config)
and super-resolve an image or a folder in this process."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from evaluation.infer import SuperResolver, output_names, require_images, run_infer, write_skipped
from training.run_state import CKPT_DIR, latest_checkpoint
from vlcot.config import policy_folder_problem, vq_folder_problem
from vlcot.errors import BadPath, UserError, output_folder


@dataclass
class ResolvedCheckpoint:
    policy_dir: Path  # HF layout (config.json + safetensors + tokenizer)
    vq_dir: Path
    run_config: Optional[Path]  # the config.yaml of the run that wrote it, when found


def _ancestors(p: Path, levels: int = 4) -> List[Path]:
    out = [p]
    for _ in range(levels):
        p = p.parent
        out.append(p)
    return out


def resolve_checkpoint(path: str | Path, vq: str | Path | None = None) -> ResolvedCheckpoint:
    """Accepts an HF policy folder, a learner checkpoint (with hf/), or a run folder (its
    latest checkpoint). The VQ tokenizer is `vq` or the nearest `vq/` folder above the
    checkpoint (where the trainer keeps it); the run config is the nearest config.yaml."""
    p = Path(path).resolve()
    if (p / "config.json").is_file():
        policy = p
    elif (p / "hf" / "config.json").is_file():
        policy = p / "hf"
    elif (p / CKPT_DIR).is_dir() and latest_checkpoint(str(p)) is not None:
        policy = latest_checkpoint(str(p)) / "hf"  # type: ignore[operator]
    else:
        raise BadPath(f"--checkpoint {path}: not an HF policy folder (config.json), a checkpoint "
                      f"folder (hf/config.json) or a run folder ({CKPT_DIR}/step_*)")
    why = policy_folder_problem(policy)  # a llama, an unconverted release, no weights: before anything loads
    if why:
        raise BadPath(f"--checkpoint {path}: {why}")
    if vq is not None:
        vq_dir = Path(vq)
        why = vq_folder_problem(vq_dir)
        if why:
            raise BadPath(f"--vq {vq}: {why}; give the VQ tokenizer folder the checkpoint was trained with")
    else:
        found = [a / "vq" for a in _ancestors(policy) if (a / "vq" / "vq_config.json").is_file()]
        if not found:
            raise BadPath(f"--checkpoint {path}: no VQ tokenizer (vq/vq_config.json) in or above {policy}; "
                          "pass --vq DIR")
        vq_dir = found[0]
        why = vq_folder_problem(vq_dir)
        if why:
            raise BadPath(f"--checkpoint {path}: the VQ tokenizer found above it is damaged: {why}; pass --vq DIR")
    configs = [a / "config.yaml" for a in _ancestors(policy) if (a / "config.yaml").is_file()]
    return ResolvedCheckpoint(policy, vq_dir, configs[0] if configs else None)


def run_infer_job(cfg, ckpt: ResolvedCheckpoint, image: str, out_dir: str, progress: bool = True) -> Dict[str, Any]:
    files, skipped_names = require_images(image, "--image")  # refused here, before the model loads
    output_folder(out_dir, "--out")
    t0 = time.perf_counter()
    resolver = SuperResolver(cfg, ckpt.policy_dir, ckpt.vq_dir)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    records = run_infer(resolver, files, output_names(files), out_dir, progress=progress)
    seconds = time.perf_counter() - t1
    ok = [r for r in records if r["status"] == "ok"]
    skipped = [{"input": p, "reason": why} for p, why in skipped_names] + [r for r in records if r["status"] != "ok"]
    write_skipped(out_dir, skipped)
    summary = {"written": len(ok), "skipped": len(skipped), "seconds": seconds, "load_s": load_s,
               "images_per_s": len(ok) / seconds if seconds > 0 else 0.0, "out_dir": str(out_dir),
               "policy": str(ckpt.policy_dir), "vq": str(ckpt.vq_dir), "mode": cfg.infer.mode, "engine": cfg.infer.engine,
               "tiles": sum(len(r["tiles"]) for r in ok),
               "fallback_tiles": sum(r["fallback_tiles"]["final_image"] for r in ok)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "infer_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def named_path(spec: str, what: str) -> Tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its last folder."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise UserError(f"{what} {spec!r}: expected NAME=PATH")
        return name, path
    return Path(spec.rstrip("/")).name, spec


def resolve_checkpoints(specs: Sequence[str], vq: Optional[str] = None) -> Dict[str, ResolvedCheckpoint]:
    """--checkpoint [NAME=]DIR specs -> {name: ResolvedCheckpoint}; names must be distinct."""
    out: Dict[str, ResolvedCheckpoint] = {}
    for spec in specs:
        name, path = named_path(spec, "--checkpoint")
        if name in out:
            raise UserError(f"--checkpoint {spec!r}: the name {name!r} is taken; name it: NAME={path}")
        out[name] = resolve_checkpoint(path, vq)
    return out


def pick_config_path(explicit: Optional[str], ckpt: ResolvedCheckpoint) -> Optional[str]:
    """--config wins; else the run's own config.yaml; else the default."""
    if explicit:
        return explicit
    return str(ckpt.run_config) if ckpt.run_config else None


def summary_line(s: Dict[str, Any]) -> str:
    return (f"infer: {s['written']} images written to {s['out_dir']} ({s['skipped']} skipped), {s['tiles']} tiles, "
            f"{s['fallback_tiles']} final-image fallbacks, {s['images_per_s']:.2f} images/s "
            f"({s['engine']} engine, {s['mode']} mode)")
