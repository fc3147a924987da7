"""The results table in the layout of the paper's Table 1: one block per test set, one row
per metric (with its direction), one column per evaluated checkpoint or baseline.

Cells: the mean over the set's images; "n/a" (markdown) / empty (CSV) for a metric that is
unavailable (CSV: "unavailable"), with the reason in the notes below the table; "–" where the metric does not
apply (full-reference metrics on an unpaired set, chain-of-thought metrics for a column
that has no text, e.g. bicubic).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

NOT_APPLICABLE = "–"
UNAVAILABLE = "n/a"


@dataclass
class Row:
    key: str
    label: str  # e.g. "PSNR↑"
    decimals: int = 4


@dataclass
class Block:
    dataset: str
    paired: bool
    images: int
    rows: List[Row]
    columns: List[str]
    cells: Dict[Tuple[str, str], object] = field(default_factory=dict)  # (row key, column) -> float | str


def fmt(v: object, decimals: int) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return NOT_APPLICABLE
    v = float(v)
    if math.isinf(v):
        return "inf"
    return f"{v:.{decimals}f}"


def best_columns(block: Block, row: Row, higher_better: Optional[bool]) -> List[str]:
    if higher_better is None:
        return []
    vals = {c: block.cells.get((row.key, c)) for c in block.columns}
    nums = {c: float(v) for c, v in vals.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}
    if len(nums) < 2:
        return []
    best = max(nums.values()) if higher_better else min(nums.values())
    return [c for c, v in nums.items() if v == best]


def markdown(blocks: List[Block], directions: Dict[str, Optional[bool]], notes: List[str]) -> str:
    lines: List[str] = []
    for b in blocks:
        lines.append(f"### {b.dataset} ({'paired' if b.paired else 'unpaired'}, {b.images} images)\n")
        lines.append("| Metric | " + " | ".join(b.columns) + " |")
        lines.append("|---|" + "---|" * len(b.columns))
        for r in b.rows:
            best = best_columns(b, r, directions.get(r.key))
            cells = []
            for c in b.columns:
                s = fmt(b.cells.get((r.key, c)), r.decimals)
                cells.append(f"**{s}**" if c in best else s)
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines.append("Notes:\n")
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def to_csv(blocks: List[Block]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    columns = []
    for b in blocks:
        columns += [c for c in b.columns if c not in columns]
    w.writerow(["dataset", "metric"] + columns)
    for b in blocks:
        for r in b.rows:
            row = [b.dataset, r.label]
            for c in columns:
                v = b.cells.get((r.key, c))
                if v is None or v == NOT_APPLICABLE:
                    row.append("")
                elif isinstance(v, str):
                    row.append("unavailable" if v == UNAVAILABLE else v)
                else:
                    row.append(repr(float(v)))
            w.writerow(row)
    return buf.getvalue()
