"""What a GRPO run carries across a restart: the data cursor and the driver's part of a
checkpoint (`<run_dir>/checkpoints/step_N/driver_state.json`, beside the learner's weights
and optimizer state)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from training.step_data import CollectedRollout, DispatchedStep

CKPT_DIR = "checkpoints"
DRIVER_STATE = "driver_state.json"
PENDING_STEP = "pending_step.json"  # async mode: the next step's generation, collected at the checkpoint


class DataCursor:
    """Epoch-shuffled walk over the manifest; its whole state is JSON (for resume).

    With `sources` (the source image of each record) an epoch is spread over the sources
    instead of plainly shuffled: each source's records in a shuffled order, dealt round-robin
    over the sources in a shuffled order. Every run of as many prompts as there are sources
    then holds each source once (while they have records left), so a step's reward reflects
    the policy rather than which photographs the draw happened to pick.
    """

    def __init__(self, n: int, seed: int, sources: Optional[Sequence[str]] = None):
        if sources is not None and len(sources) != n:
            raise ValueError(f"{len(sources)} sources for {n} records")
        self.n = n
        self.sources = list(sources) if sources is not None else None
        self.rng = np.random.default_rng(seed)
        self.order: List[int] = []
        self.position = 0
        self.epoch = 0

    def _epoch_order(self) -> List[int]:
        if self.sources is None:
            return [int(i) for i in self.rng.permutation(self.n)]
        by_source: Dict[str, List[int]] = {}
        for i, src in enumerate(self.sources):
            by_source.setdefault(src, []).append(i)
        queues = [[group[j] for j in self.rng.permutation(len(group))] for group in by_source.values()]
        queues = [queues[j] for j in self.rng.permutation(len(queues))]
        order: List[int] = []
        for r in range(max(len(q) for q in queues)):
            order += [q[r] for q in queues if r < len(q)]
        return order

    def take(self, k: int) -> List[int]:
        out = []
        while len(out) < k:
            if self.position >= len(self.order):
                self.order = self._epoch_order()
                self.position = 0
                self.epoch += 1
            out.append(self.order[self.position])
            self.position += 1
        return out

    def state(self) -> Dict[str, Any]:
        return {"order": self.order, "position": self.position, "epoch": self.epoch, "rng": self.rng.bit_generator.state}

    def restore(self, s: Dict[str, Any]) -> None:
        self.order, self.position, self.epoch = list(s["order"]), int(s["position"]), int(s["epoch"])
        self.rng.bit_generator.state = s["rng"]


def latest_checkpoint(run_dir: str) -> Optional[Path]:
    root = Path(run_dir) / CKPT_DIR
    done = sorted(p for p in root.glob("step_*") if (p / DRIVER_STATE).is_file())
    return done[-1] if done else None


@dataclass
class DriverState:
    """The driver's state after step `step`: enough to go on at step + 1 in the same MLflow run."""

    step: int
    version: int  # policy version the learner holds
    cursor: Dict[str, Any]  # DataCursor.state()
    mlflow_run_id: Optional[str]
    reward_history: List[float] = field(default_factory=list)  # total reward per step
    component_history: Dict[str, List[float]] = field(default_factory=dict)  # per reward, per step
    lr_schedule: Optional[Dict[str, Any]] = None  # what decided the learning rates (None: older checkpoint)

    def write(self, checkpoint: Path) -> None:
        (Path(checkpoint) / DRIVER_STATE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, checkpoint: Path) -> "DriverState":
        """A checkpoint's driver state; keys that older checkpoints lack take their defaults."""
        d = json.loads((Path(checkpoint) / DRIVER_STATE).read_text())
        return cls(int(d["step"]), int(d["version"]), d["cursor"], d.get("mlflow_run_id"),
                   list(d.get("reward_history", [])), dict(d.get("component_history", {})), d.get("lr_schedule"))


def write_pending_step(checkpoint: Path, pending: DispatchedStep) -> None:
    """The next step's collected generation (async mode), written before the driver state that
    makes the checkpoint count (`latest_checkpoint`)."""
    doc = {"step": pending.step, "records": list(pending.records), "collected": pending.collected.to_json()}
    (Path(checkpoint) / PENDING_STEP).write_text(json.dumps(doc))


def read_pending_step(checkpoint: Path) -> Optional[DispatchedStep]:
    """The step written by `write_pending_step`, already collected; None in sync mode or after
    the run's last step."""
    path = Path(checkpoint) / PENDING_STEP
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return DispatchedStep(int(doc["step"]), list(doc["records"]), collected=CollectedRollout.from_json(doc["collected"]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    kept = sorted((Path(run_dir) / CKPT_DIR).glob("step_*"))
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
