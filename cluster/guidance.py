"""Classifier-free-guidance counts per generation, from the rollout workers' cumulative counters:
`rollout/cfg_twins` (unconditional branches started) and `rollout/cfg_unguided_codes` (image codes
drawn without theirs), read by the rollout pool after each collect."""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Sequence

from rollout.kv_budget import unguided_hint

log = logging.getLogger(__name__)

GUIDANCE_KEYS = ("cfg_twins", "cfg_unguided_codes")  # RolloutWorker.throughput() counters, cumulative per worker


def guidance_metrics(before: Sequence[Dict[str, float]], now: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """`rollout/cfg_twins` and `rollout/cfg_unguided_codes` of one generation: the workers'
    cumulative counters (one dict per worker slot) now minus before; a slot that is new or whose
    counters went back (its worker was replaced) counts from 0."""
    out = {f"rollout/{k}": 0.0 for k in GUIDANCE_KEYS}
    for slot, counts in enumerate(now):
        old = before[slot] if slot < len(before) else {}
        restarted = any(float(counts.get(k, 0.0)) < float(old.get(k, 0.0)) for k in GUIDANCE_KEYS)
        for k in GUIDANCE_KEYS:
            out[f"rollout/{k}"] += float(counts.get(k, 0.0)) - (0.0 if restarted else float(old.get(k, 0.0)))
    return out


class GuidanceCounter:
    """Turns the rollout workers' cumulative guidance counters into each generation's counts
    (`guidance_metrics` since the last reading) and warns, naming the setting for the hardware
    (`on_gpu`), when image codes were drawn without their unconditional twin."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.seen: List[Dict[str, float]] = []

    def since_last(self, read: Callable[[], List[Dict[str, float]]]) -> Dict[str, float]:
        """`read()` gives the counters now (one dict per worker slot); empty when it fails (a
        worker lost since the collect: its share is counted next time)."""
        try:
            now = read()
        except Exception as exc:
            log.warning("rollout guidance counters not read (%s: %s)", type(exc).__name__, exc)
            return {}
        m = guidance_metrics(self.seen, now)
        self.seen = now
        if m["rollout/cfg_unguided_codes"]:
            log.warning("classifier-free guidance: %d image codes of this generation were drawn without their "
                        "unconditional twin: %s", m["rollout/cfg_unguided_codes"], unguided_hint(not self.on_gpu))
        return m
