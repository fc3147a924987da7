"""The held-out check at both ends of a GRPO run.

Greedy generations on prompts no training step sees (`data.heldout_per_image` crops with
their own degradation draws, written by prepare-data to heldout.jsonl), scored by the run's
own reward workers: once with the policy GRPO starts from (the cold-start SFT result) and
once with the policy it ends with. Greedy, because sampling noise would swamp the
difference between two checkpoints of a small policy. The two columns go side by side into
`<run_dir>/heldout.md` and `heldout.json`, the summary and MLflow (`heldout/start/*`,
`heldout/end/*`). The start column is written as soon as it is measured, so a resumed run
still has it.

Beside the rewards, the report says which degradation words each policy wrote: per slot, how
often the word was right, against always naming the training prompts' most frequent word
for that slot, and how many different five-word answers it gave. A policy that writes the
same words for every prompt is guessing the training set's prior, not reading the image.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from training.jobs import encode_prompts
from training.sample_scoring import score_results
from vlcot.manifest import ManifestRecord, heldout_manifest_path, read_manifest
from vlcot.trace import SLOTS

log = logging.getLogger(__name__)
REPORT_JSON, REPORT_MD = "heldout.json", "heldout.md"


@dataclass
class DegradationWords:
    """The degradation words one policy wrote on the held-out prompts."""

    accuracy: Dict[str, float]  # slot -> fraction of prompts whose word is the label's
    distinct: int  # different five-word answers (an unparsed slot counts as its own word)
    commonest: str  # the most frequent answer
    commonest_count: int

    @classmethod
    def of(cls, predicted: Sequence[Sequence[Optional[str]]], labels: Sequence[Sequence[str]]) -> "DegradationWords":
        if not predicted or len(predicted) != len(labels):
            raise ValueError(f"{len(predicted)} answers for {len(labels)} labelled prompts")
        answers = Counter(" ".join(w or "?" for w in words) for words in predicted)
        commonest, count = answers.most_common(1)[0]
        accuracy = {slot: float(np.mean([p[i] == ref[i] for p, ref in zip(predicted, labels)]))
                    for i, slot in enumerate(SLOTS)}
        return cls(accuracy, len(answers), commonest, count)


def majority_accuracy(training: Sequence[Sequence[str]], heldout: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Per slot: the held-out score of always naming the training labels' most frequent word."""
    if not training or not heldout:
        raise ValueError("the majority-word baseline needs training and held-out labels")
    commonest = [Counter(t[i] for t in training).most_common(1)[0][0] for i in range(len(SLOTS))]
    return {slot: float(np.mean([ref[i] == commonest[i] for ref in heldout])) for i, slot in enumerate(SLOTS)}


@dataclass
class HeldOutScore:
    """Mean rewards of one policy on the held-out prompts (one greedy sample each)."""

    policy: str  # what was measured: "SFT" / "initial" / "GRPO"
    version: int  # the policy version the rollout workers held
    prompts: int  # prompts scored
    refused: int  # prompts the rollout engine refused (each logged)
    means: Dict[str, float]  # reward name -> mean over the prompts; "total" too
    sample_versions: List[int] = field(default_factory=list)  # policy versions that generated them
    words: Optional[DegradationWords] = None  # the degradation words it wrote


def heldout_for(cfg, run_dir: Path, vq, codec, layout,
                training_labels: Sequence[Sequence[str]] = ()) -> Optional["HeldOutEval"]:
    """The run's held-out prompts (`trainer.heldout_eval`), or None with a line saying why not.
    `training_labels` (the GRPO prompts' degradation words) give the majority-word baseline."""
    if not cfg.trainer.heldout_eval:
        return None
    path = heldout_manifest_path(cfg.data)
    if not path.is_file():
        how = ("prepare-data writes it with data.heldout_per_image > 0" if not cfg.data.heldout_per_image else
               "the data was prepared without it: run `realsr-r1 prepare-data` again to add it")
        print(f"held-out eval: none ({path} does not exist; {how})")
        return None
    records = read_manifest(path)
    held = HeldOutEval(records, encode_prompts(records, vq, cfg.image, codec, layout, path), path, run_dir,
                       list(cfg.rewards.weights), cfg.image.hr_size, codec, layout)
    if training_labels:
        held.majority = majority_accuracy(training_labels, [r.degradation.labels for r in records])
    return held


class HeldOutEval:
    def __init__(self, records: List[ManifestRecord], prompt_ids: List[List[int]], manifest: Path, run_dir: Path,
                 reward_names: List[str], hr_size: int, codec, layout):
        if not records:
            raise ValueError(f"the held-out manifest {manifest} is empty")
        self.records, self.prompt_ids, self.manifest = records, prompt_ids, manifest
        self.report = Path(run_dir) / REPORT_JSON
        self.reward_names, self.hr_size, self.codec, self.layout = list(reward_names), hr_size, codec, layout
        self.majority: Optional[Dict[str, float]] = None  # per slot, always the training set's commonest word

    def measure(self, generate: Callable[..., List[Any]], rewards, policy: str, version: int) -> HeldOutScore:
        """One greedy generation per held-out prompt (`generate(prompts, **how)`: the driver's
        rollout pool, which handles a worker lost meanwhile), scored by the reward pool."""
        results = generate(self.prompt_ids, seed=0, n=1, greedy=True)
        scored = score_results(range(len(self.records)), results, self.records, self.codec, self.layout, self.hr_size,
                               rewards, "heldout")
        for refused_prompt in scored.refused:
            log.warning("held-out prompt %s refused: %s", self.records[refused_prompt.record].id, refused_prompt.reason)
        versions = {int(s.sample.version) for s in scored.samples}
        predicted = [list(s.parsed.degradation) for s in scored.samples]
        labels = [self.records[s.record].degradation.labels for s in scored.samples]
        got = [s.reward for s in scored.samples]
        means = {name: float(np.mean([r.components[name] for r in got])) if got else float("nan")
                 for name in self.reward_names}
        means["total"] = float(np.mean([r.total for r in got])) if got else float("nan")
        if versions != {version}:  # a worker not holding the policy being measured would blur the columns
            log.warning("held-out check of version %d: samples came from versions %s", version, sorted(versions))
        words = DegradationWords.of(predicted, labels) if predicted else None
        return HeldOutScore(policy, version, len(got), len(scored.refused), means, sorted(versions), words)

    def at_start(self, generate, rewards, policy: str, version: int) -> None:
        """The start column, written at once (a resumed run reads it back)."""
        self.save(self.measure(generate, rewards, policy, version), None)

    def at_end(self, generate, rewards, tracker, version: int) -> Dict[str, Any]:
        """The end column beside the start one: heldout.md/json, a printed line, MLflow."""
        t0 = time.perf_counter()
        start = score_from(self.load().get("start"))
        end = self.measure(generate, rewards, "GRPO", version)
        report = self.save(start, end)
        table = self.report.with_name(REPORT_MD)
        print(summary_line(start, end, len(self.records)) + f" [{time.perf_counter() - t0:.0f}s; {table}]")
        for column, score in (("start", start), ("end", end)):
            if score:
                tracker.metrics({f"heldout/{column}/{k}": v for k, v in score.means.items()}, step=version)
            if score and score.words:
                tracker.metrics({f"heldout/{column}/degradation_answers": float(score.words.distinct),
                                 **{f"heldout/{column}/degradation_{k}": v for k, v in score.words.accuracy.items()}},
                                step=version)
        tracker.artifact(str(table))
        return report

    # ---- the report ------------------------------------------------------------------------
    def load(self) -> Dict[str, Any]:
        return json.loads(self.report.read_text()) if self.report.is_file() else {}

    def save(self, start: Optional[HeldOutScore], end: Optional[HeldOutScore]) -> Dict[str, Any]:
        """Write heldout.json and heldout.md; returns what was written."""
        report = {"manifest": str(self.manifest), "prompts": len(self.records), "decoding": "greedy",
                  "start": asdict(start) if start else None, "end": asdict(end) if end else None,
                  "majority_words": self.majority}
        self.report.write_text(json.dumps(report, indent=2))
        self.report.with_name(REPORT_MD).write_text(render(report))
        return report


def score_from(d: Optional[Dict[str, Any]]) -> Optional[HeldOutScore]:
    if not d:
        return None
    d = dict(d)
    words = d.pop("words", None)
    return HeldOutScore(**d, words=DegradationWords(**words) if words else None)


def _words_table(cols: List[HeldOutScore], majority: Optional[Dict[str, float]]) -> List[str]:
    """Per slot, how often each policy named the degradation word right, and how many
    different answers it gave; a policy with one answer for every prompt is named."""
    cols = [s for s in cols if s.words]
    if not cols:
        return []
    head = " | ".join(f"{s.policy} (v{s.version})" for s in cols) + (" | majority word" if majority else "")
    lines = ["", "Degradation words: the fraction of prompts whose word is right, per slot"
             + (" (majority word: always the GRPO prompts' most frequent word for the slot)" if majority else "")
             + ".", "", f"| slot | {head} |", "|---|" + "---|" * (len(cols) + bool(majority))]
    for slot in SLOTS:
        lines.append(f"| {slot} | " + " | ".join(f"{s.words.accuracy[slot]:.3f}" for s in cols)
                     + (f" | {majority[slot]:.3f}" if majority else "") + " |")
    mean = [np.mean(list(s.words.accuracy.values())) for s in cols]
    lines.append("| mean of five | " + " | ".join(f"{m:.3f}" for m in mean)
                 + (f" | {np.mean(list(majority.values())):.3f}" if majority else "") + " |")
    lines.append("| different answers | " + " | ".join(str(s.words.distinct) for s in cols) + (" | 1" if majority else "") + " |")
    for s in cols:
        if s.words.distinct == 1 and s.prompts > 1:
            lines.append(f"\n{s.policy} wrote the same degradation words for all {s.prompts} prompts "
                         f"(\"{s.words.commonest}\"): it does not read them from the image.")
    return lines


def render(report: Dict[str, Any]) -> str:
    """Markdown: one row per reward, the start and end policy side by side, and the change."""
    start, end = score_from(report.get("start")), score_from(report.get("end"))
    cols = [s for s in (start, end) if s]
    head = " | ".join(f"{s.policy} (v{s.version})" for s in cols)
    lines = [f"Held-out prompts: {report['prompts']} from {report['manifest']}, one greedy sample each.", "",
             f"| reward | {head} |" + (" change |" if start and end else ""),
             "|---|" + "---|" * (len(cols) + (1 if start and end else 0))]
    names = list((start or end).means) if cols else []
    for name in names:
        row = f"| {name} | " + " | ".join(f"{s.means[name]:.3f}" for s in cols) + " |"
        if start and end:
            row += f" {end.means[name] - start.means[name]:+.3f} |"
        lines.append(row)
    lines += _words_table(cols, report.get("majority_words"))
    for s in cols:
        if s.refused:
            lines.append(f"\n{s.policy}: {s.refused} prompts refused by the rollout engine (logged), not scored.")
    if not start:
        lines.append("\nThe start policy was not measured (the run was resumed from before this report existed).")
    return "\n".join(lines) + "\n"


def summary_line(start: Optional[HeldOutScore], end: Optional[HeldOutScore], prompts: int) -> str:
    """One line: every reward's start -> end mean."""
    if start and end:
        parts = [f"{k} {start.means[k]:.3f} -> {end.means[k]:.3f}" for k in end.means]
        if start.words and end.words:
            parts.append(f"different degradation answers {start.words.distinct} -> {end.words.distinct}")
        return f"held-out ({prompts} prompts, greedy) {start.policy} -> {end.policy}: " + ", ".join(parts)
    only = start or end
    return (f"held-out ({prompts} prompts, greedy) {only.policy}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in only.means.items())) if only else "held-out: not measured"
