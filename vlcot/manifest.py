"""The data manifest: one typed record per training or held-out sample, and the one place that
reads, writes and validates `manifest.jsonl` (and `heldout.jsonl`, the same format).

`realsr-r1 prepare-data` (vlcot/data.py) writes it; cold-start SFT, the GRPO driver, the
held-out check, `realsr-r1 eval` and the benchmarks read it, by attribute. On disk each line is
one JSON object, keys in this order, paths relative to the manifest's folder:

    {"id", "source", "hr_path", "lr_path", "hr_size", "hr_usm", "lr_size", "seed",
     "crop": [left, top, side], "captions": {"x4", "x2", "x1"} | null, "tags": [...],
     "degradation": {"labels": [5 words], "text": "...", "params": {...}}, "notes": [...]}

Manifests written before `hr_usm` and `crop` existed still load (not sharpened; crop unknown).
A row that is not valid JSON, or lacks a field, or holds one of the wrong type, is a UserError
naming the file, the line and the field: a manifest is written by prepare-data, so damage
should not pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vlcot.config import DataConfig
from vlcot.errors import BadPath, UserError
from vlcot.trace import SLOT_WORDS, SLOTS

FIX = "give a manifest.jsonl that `realsr-r1 prepare-data` wrote"
Crop = Tuple[int, int, int]  # left, top, side of the square cut from the source image


@dataclass(frozen=True)
class Captions:
    """The three understanding texts of an image: x4 (rough), x2 (middle), x1 (final)."""

    x4: str
    x2: str
    x1: str


@dataclass(frozen=True)
class DegradationRecord:
    """What degraded a sample's LR: its label words (one per slot of vlcot.trace.SLOTS), their
    text form and the drawn parameters of the synthesis pipeline (free-form: they follow the
    `degradation.*` config)."""

    labels: List[str]
    text: str
    params: Dict[str, Any]


@dataclass
class ManifestRecord:
    """One sample: an HR crop, the LR degraded from it, and the labels that train the policy.
    Paths are as read: absolute after `read_manifest`, relative to the manifest when prepared."""

    id: str
    source: str
    hr_path: str
    lr_path: str
    hr_size: int
    lr_size: int
    seed: int
    degradation: DegradationRecord
    captions: Optional[Captions] = None
    tags: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    hr_usm: bool = False  # the HR on disk is unsharp-masked (data.usm_hr)
    crop: Optional[Crop] = None  # None in manifests written before crops were recorded

    def to_json(self, folder: Optional[Path] = None) -> Dict[str, Any]:
        """The on-disk object; with `folder`, absolute paths made relative to it."""
        def rel(p: str) -> str:
            return Path(os.path.relpath(p, folder)).as_posix() if folder is not None and os.path.isabs(p) else p

        row: Dict[str, Any] = {"id": self.id, "source": self.source, "hr_path": rel(self.hr_path),
                               "lr_path": rel(self.lr_path), "hr_size": self.hr_size, "hr_usm": self.hr_usm,
                               "lr_size": self.lr_size, "seed": self.seed}
        if self.crop is not None:
            row["crop"] = list(self.crop)
        row["captions"] = None if self.captions is None else {"x4": self.captions.x4, "x2": self.captions.x2,
                                                              "x1": self.captions.x1}
        row["tags"] = list(self.tags)
        row["degradation"] = {"labels": list(self.degradation.labels), "text": self.degradation.text,
                              "params": self.degradation.params}
        row["notes"] = list(self.notes)
        return row

    @classmethod
    def from_json(cls, row: Any, folder: Optional[Path] = None) -> "ManifestRecord":
        """A record from one on-disk object, paths resolved against `folder` when given. A bad
        object raises RecordError naming the field."""
        if not isinstance(row, dict):
            raise RecordError("", f"a JSON {type(row).__name__}, not a record")

        def path(key: str) -> str:
            p = _get(row, key, str)
            return str((folder / p).resolve()) if folder is not None else p

        deg = _get(row, "degradation", dict)
        labels = _strings(_get(deg, "labels", list, "degradation."), "degradation.labels")
        if len(labels) != len(SLOTS):
            raise RecordError("degradation.labels", f"has {len(labels)} words, not one per slot {SLOTS}")
        for i, (slot, word) in enumerate(zip(SLOTS, labels)):
            if word not in SLOT_WORDS[slot]:
                raise RecordError(f"degradation.labels[{i}]", f"{word!r} is not a {slot} word {SLOT_WORDS[slot]}")
        caps = _get(row, "captions", (dict, type(None)))
        crop = _get(row, "crop", (list, type(None)), default=None)
        if crop is not None and (len(crop) != 3 or not all(_is_int(c) for c in crop)):
            raise RecordError("crop", "not [left, top, side] integers")
        return cls(
            id=_get(row, "id", str), source=_get(row, "source", str), hr_path=path("hr_path"), lr_path=path("lr_path"),
            hr_size=_get(row, "hr_size", int), lr_size=_get(row, "lr_size", int), seed=_get(row, "seed", int),
            degradation=DegradationRecord(labels, _get(deg, "text", str, "degradation."),
                                          _get(deg, "params", dict, "degradation.")),
            captions=None if caps is None else Captions(*(_get(caps, k, str, "captions.") for k in ("x4", "x2", "x1"))),
            tags=_strings(_get(row, "tags", list), "tags"), notes=_strings(_get(row, "notes", list), "notes"),
            hr_usm=_get(row, "hr_usm", bool, default=False), crop=None if crop is None else tuple(crop),
        )


class RecordError(ValueError):
    """A manifest object that is not a record: `field` names the key (dotted when nested)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field!r} {problem}" if field else problem)
        self.field, self.problem = field, problem


_MISSING = object()
JSON_KINDS = {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}  # Python type -> JSON name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(obj: Dict[str, Any], key: str, kind, prefix: str = "", default: Any = _MISSING) -> Any:
    """`obj[key]` checked to be of `kind` (bool is not an int here); a missing key is an error
    unless a `default` is given."""
    if key not in obj:
        if default is not _MISSING:
            return default
        raise RecordError(prefix + key, "is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = _is_int(value) if kinds == (int,) else isinstance(value, kinds)
    if not ok:
        want = " or ".join("integer" if k is int else JSON_KINDS[k] for k in kinds)
        raise RecordError(prefix + key, f"is a JSON {_json_kind(value)}, not {want}")
    return value


def _strings(values: List[Any], name: str) -> List[str]:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise RecordError(f"{name}[{bad}]", f"is a JSON {_json_kind(values[bad])}, not a string")
    return list(values)


def _json_kind(value: Any) -> str:
    return JSON_KINDS.get(type(value), "number")


def read_manifest(path: str | Path, what: str = "manifest") -> List[ManifestRecord]:
    """The records of a manifest, hr_path/lr_path made absolute. A missing file or a bad line is
    a UserError naming `what` (the flag or key that named it), the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise BadPath(f"{what} {path} is not a file ({'a folder' if path.is_dir() else 'nothing is there'}): {FIX}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file: {FIX}") from None
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{what} {path}:{i}: not valid JSON ({exc.msg} at column {exc.colno}): {FIX}") from None
        try:
            records.append(ManifestRecord.from_json(row, path.parent))
        except RecordError as exc:
            raise UserError(f"{what} {path}:{i}: {exc}: {FIX}") from None
    return records


def write_manifest(path: str | Path, records: Sequence[ManifestRecord]) -> None:
    """Write `records` to `path` (atomically), absolute paths made relative to its folder."""
    path = Path(path)
    write_jsonl(path, [r.to_json(path.parent.resolve()) for r in records])


def write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """One JSON object per line, written beside and then moved over `path`, so a reader never
    sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def manifest_path(data: DataConfig) -> Path:
    """`data.manifest`, else manifest.jsonl in `data.output_dir`."""
    return Path(data.manifest) if data.manifest else Path(data.output_dir) / "manifest.jsonl"


def heldout_manifest_path(data: DataConfig) -> Path:
    """`data.heldout_manifest`, else heldout.jsonl beside the manifest."""
    if data.heldout_manifest:
        return Path(data.heldout_manifest)
    return manifest_path(data).parent / "heldout.jsonl"
