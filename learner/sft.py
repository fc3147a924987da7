"""Cold-start SFT: VLCoT traces synthesised from the manifest, loss on response tokens only.

Each manifest record becomes a full trace (`vlcot.examples.build_example`): degradation
words from its labels, its x4/x2/x1 captions, and the HR image at HR/4, HR/2 and HR as the
three images. Training runs on the same DeepSpeed learner group as GRPO.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from learner.batch import pack
from learner.config import SFTConfig
from vlcot.examples import build_example
from vlcot.manifest import ManifestRecord

log = logging.getLogger(__name__)


def build_sft_examples(records: Sequence[ManifestRecord], vq, codec, layout, image_cfg) -> Tuple[List[List[int]], List[List[int]], List[str]]:
    """Manifest records -> (prompts, responses, skipped reasons). A record whose images
    cannot be read is skipped with its reason, not fatal."""
    prompts, responses, skipped = [], [], []
    for rec in records:
        try:
            ex = build_example(rec, vq, codec, layout, image_cfg)
        except (ValueError, OSError) as exc:
            skipped.append(f"{rec.id}: {exc}")
            log.warning("SFT example skipped: %s", skipped[-1])
            continue
        prompts.append(ex.prompt_ids)
        responses.append(ex.response_ids)
    return prompts, responses, skipped


def run_sft(group, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], cfg: SFTConfig,
            pad_id: int, image_ids: Optional[np.ndarray] = None, seed: int = 0,
            on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
    """`cfg.steps` optimizer steps, each on `cfg.batch_size` examples drawn without
    replacement per epoch (deterministic for `seed`). Returns per-step metrics."""
    if not prompts:
        raise ValueError("no SFT examples: the manifest produced none")
    full = pack(prompts, responses, pad_id, image_ids)
    n = len(prompts)
    rng = np.random.default_rng(seed)
    order: List[int] = []
    history = []
    group.set_lr(cfg.lr)
    for step in range(cfg.steps):
        idx = []
        while len(idx) < cfg.batch_size:
            if not order:
                order = list(rng.permutation(n))
            idx.append(order.pop())
        batch = {k: v[np.asarray(idx)] for k, v in full.items()}
        t0 = time.perf_counter()
        metrics = group.sft_step(batch)
        metrics["timing/step_s"] = time.perf_counter() - t0
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history
