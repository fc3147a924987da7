"""The test sets and table columns of `realsr-r1 eval` (app/eval_job.py): a set from a
manifest or from LR (and HR) folders, or the built-in one; a column from a checkpoint, another
method's outputs or bicubic."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from app.infer_job import named_path
from training.jobs import ensure_data
from evaluation.infer import list_inputs, output_names, require_images
from vlcot.errors import BadPath, existing_folder
from vlcot.manifest import read_manifest


@dataclass
class EvalItem:
    """One image of a test set: its LR file, and the HR, labels and tags where known."""

    id: str
    lr_path: str
    hr_path: Optional[str] = None
    labels: Optional[List[str]] = None
    tags: Optional[List[str]] = None


@dataclass
class EvalSet:
    """A named test set; `skipped` lists (file, why) of inputs left out."""

    name: str
    items: List[EvalItem]
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return bool(self.items) and all(i.hr_path for i in self.items)


@dataclass
class Column:
    """One column of the table: a checkpoint, another method's outputs, or bicubic."""

    name: str
    kind: str  # checkpoint | sr | bicubic
    path: str = ""


def _sidecar(lr: Path) -> Dict[str, Any]:
    f = lr.with_suffix(".json")
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except ValueError:
        return {}
    labels = d.get("labels") or (d.get("degradation") or {}).get("labels")
    return {"labels": list(labels) if labels else None, "tags": list(d.get("tags") or []) or None}


def load_set(spec: str) -> EvalSet:
    """NAME=manifest.jsonl, or NAME=LR_DIR[,HR_DIR] (paired by file stem; `<stem>.json`
    beside an LR image may give `labels` and `tags`)."""
    name, path = named_path(spec, "--data")
    if path.endswith(".jsonl"):
        rows = read_manifest(path, "--data")
        if not rows:
            raise BadPath(f"--data {spec}: the manifest is empty: give one that prepare-data wrote")
        items = [EvalItem(r.id, r.lr_path, r.hr_path, list(r.degradation.labels), list(r.tags)) for r in rows]
        return EvalSet(name, items)
    lr_dir, _, hr_dir = path.partition(",")
    files, skipped = require_images(lr_dir, "--data")  # a set with nothing to score is refused here
    hr_by_stem: Dict[str, Path] = {}
    if hr_dir:
        existing_folder(hr_dir, "--data HR_DIR", "give NAME=LR_DIR,HR_DIR with two folders of images")
        hr_files, _ = list_inputs(hr_dir, "--data")
        hr_by_stem = {f.stem: f for f in hr_files}
    items = []
    for f, stem in zip(files, output_names(files)):
        hr = hr_by_stem.get(f.stem)
        if hr_dir and hr is None:
            skipped.append((str(f), f"no HR image with stem {f.stem!r} in {hr_dir}"))
            continue
        items.append(EvalItem(stem, str(f), str(hr) if hr else None, **_sidecar(f)))
    return EvalSet(name, items, skipped)


def builtin_set(cfg) -> EvalSet:
    """The demo's own prepared data (prepare-data first if missing)."""
    return load_set(f"builtin={ensure_data(cfg)}")
