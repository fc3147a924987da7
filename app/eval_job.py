"""`realsr-r1 eval`: super-resolve test sets with each checkpoint and score them like Table 1.

    sets      --data NAME=LR_DIR[,HR_DIR] | NAME=manifest.jsonl   (default: the built-in set)
    columns   --checkpoint [NAME=]DIR ...   plus --sr NAME=DIR (outputs of other methods,
              matched by file stem) and a bicubic baseline (unless --no-bicubic)
    work      eval.num_workers Ray actors per stage: generation (main environment) and
              metrics (IQA environment); eval.num_workers=0 runs both in this process
    outputs   <out>/table.md, table.csv, per_image.csv, grids/, <set>/<column>/{final,middle,rough,cot}/,
              summary.json; all logged to MLflow
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from app.eval_inputs import Column, EvalItem, EvalSet
from cluster.interpreters import runtime_env_for_iqa
from evaluation.cot import COT_HIGHER_BETTER, COT_LABELS, COT_METRICS, grade
from evaluation.image_metrics import METRICS, MetricShard, MetricStatus, MetricSuite, score_pairs
from evaluation.infer import SuperResolver, run_infer
from evaluation.table import NOT_APPLICABLE, UNAVAILABLE, Block, Row, markdown, to_csv
from training.contact_sheets import comparison_row
from training.jobs import start_ray
from training.tracking import Tracker
from vlcot.images import open_image

log = logging.getLogger(__name__)


# ---- generation ------------------------------------------------------------------------------
def _bicubic(item: EvalItem, scale: float, out: Path) -> Optional[str]:
    img, _, _ = open_image(item.lr_path)
    if img is None:
        return None
    f = out / "final" / f"{item.id}.png"
    f.parent.mkdir(parents=True, exist_ok=True)
    img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC).save(f)
    return str(f)


def _find_sr(sr_dir: str, item: EvalItem) -> Optional[str]:
    hits = sorted(p for p in Path(sr_dir).glob(f"{item.id}.*") if p.suffix.lower() != ".json")
    return str(hits[0]) if hits else None


def _generate(cfg, ckpt, sets: Sequence[EvalSet], outs: Sequence[Path]) -> List[List[Dict[str, Any]]]:
    """Checkpoint column: infer on every LR image of every set (outputs under the set's
    folder in `outs`). One engine per actor for the whole column, shared by the sets; each
    set's images are sharded over the eval.num_workers actors."""
    from evaluation.workers import InferWorker, shards  # local: Ray, only for eval.num_workers >= 1

    jobs = [([Path(i.lr_path) for i in es.items], [i.id for i in es.items], out) for es, out in zip(sets, outs)]
    if cfg.eval.num_workers == 0:
        resolver = SuperResolver(cfg, ckpt.policy_dir, ckpt.vq_dir)
        return [run_infer(resolver, files, names, out, progress=False) for files, names, out in jobs]
    import ray  # local, as the two below: Ray only for eval.num_workers >= 1

    from cluster.actor_group import ActorGroup

    most = max(len(files) for files, _, _ in jobs)
    group = ActorGroup("eval infer", InferWorker, len(shards(most, cfg.eval.num_workers)),
                       lambda slot: (cfg, str(ckpt.policy_dir), str(ckpt.vq_dir)),
                       dict(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus))
    try:
        results = []
        for files, names, out in jobs:
            parts = shards(len(files), len(group))  # a small set may leave actors idle
            refs = [a.run.remote([str(files[i]) for i in p], [names[i] for i in p], str(out))
                    for a, p in zip(group.workers, parts)]
            results.append([r for chunk in ray.get(refs) for r in chunk])
        return results
    finally:
        group.shutdown()


def _score(cfg, pairs: List[Tuple[str, Optional[str]]], groups: List[Tuple[List[str], List[str]]]
           ) -> Tuple[MetricShard, List[Dict[str, Optional[float]]]]:
    """Every (SR, HR) pair of every column, sharded over metric workers in the IQA environment,
    and the set-level metrics (FID) of each (SR paths, HR paths) group, spread over the same
    actors."""
    from evaluation.workers import MetricWorker, shards  # local: Ray, only for eval.num_workers >= 1

    ev = cfg.eval
    if not pairs:
        return MetricShard(status={m: MetricStatus(m, METRICS[m].label, False, "no outputs to score")
                                   for m in ev.metrics}), [{} for _ in groups]
    if ev.num_workers == 0:
        suite = MetricSuite(ev.metrics, ev.weights_dir, ev.crop_border)
        return score_pairs(suite, pairs), [suite.score_set(sr, hr) for sr, hr in groups]
    import ray  # local, as the one below: Ray only for eval.num_workers >= 1

    from cluster.actor_group import ActorGroup

    parts = shards(len(pairs), ev.num_workers)
    group = ActorGroup("eval metric", MetricWorker, len(parts),
                       lambda slot: (ev.metrics, ev.weights_dir, ev.crop_border, max(1, int(ev.num_cpus))),
                       dict(num_cpus=ev.num_cpus, num_gpus=ev.num_gpus, runtime_env=runtime_env_for_iqa(cfg.envs)))
    try:
        results = group.run("score", shards=[[pairs[i] for i in p] for p in parts])
        set_values: List[Dict[str, Optional[float]]] = [{} for _ in groups]
        if groups:
            group_parts = shards(len(groups), len(group))
            refs = [a.score_sets.remote([groups[i] for i in p]) for a, p in zip(group.workers, group_parts)]
            for p, vals in zip(group_parts, ray.get(refs)):
                for i, v in zip(p, vals):
                    set_values[i] = v
    finally:
        group.shutdown()
    merged = MetricShard(status=results[0].status)
    for r in results:
        merged.values += r.values
        merged.resized += r.resized
        merged.unreadable += r.unreadable
    return merged, set_values


# ---- the job ---------------------------------------------------------------------------------
def run_eval_job(cfg, sets: Sequence[EvalSet], columns: Sequence[Column], checkpoints: Dict[str, Any],
                 progress: bool = True) -> Dict[str, Any]:
    """`checkpoints`: column name -> ResolvedCheckpoint for the checkpoint columns."""
    from tqdm import tqdm

    ev = cfg.eval
    out = Path(ev.out_dir or Path(cfg.run_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    if ev.num_workers == 0:
        import importlib.util

        if importlib.util.find_spec("pyiqa") is None:
            raise RuntimeError("eval.num_workers=0 scores in this process, which has no pyiqa; on CPU installs "
                               "use eval.num_workers>=1 (metric workers run in the IQA environment)")
    else:
        start_ray(ev.num_workers * 2)
    scale = cfg.image.hr_size / cfg.image.lr_size
    t0 = time.perf_counter()
    sr: Dict[Tuple[str, str], List[Optional[str]]] = {}
    records: Dict[Tuple[str, str], List[Optional[Dict[str, Any]]]] = {}
    gen_s: Dict[str, float] = {}
    for col in tqdm(columns, desc="eval columns", disable=not progress):
        tc = time.perf_counter()
        if col.kind == "checkpoint":
            per_set = _generate(cfg, checkpoints[col.name], sets, [out / es.name / col.name for es in sets])
            for es, recs in zip(sets, per_set):
                by_input = {r["input"]: r for r in recs}
                rs = [by_input.get(i.lr_path) for i in es.items]
                records[(es.name, col.name)] = [r if r and r["status"] == "ok" else None for r in rs]
                sr[(es.name, col.name)] = [r["files"]["final"] if r and r["status"] == "ok" else None for r in rs]
        for es in sets:
            d = out / es.name / col.name
            if col.kind == "bicubic":
                sr[(es.name, col.name)] = [_bicubic(i, scale, d) for i in es.items]
            elif col.kind == "sr":
                sr[(es.name, col.name)] = [_find_sr(col.path, i) for i in es.items]
        gen_s[col.name] = time.perf_counter() - tc
        tqdm.write(f"eval: {col.name}: outputs ready in {gen_s[col.name]:.1f}s")
    generate_s = time.perf_counter() - t0

    keys = [(es, col) for col in columns for es in sets]
    pairs, where = [], []
    for es, col in keys:
        for j, (item, path) in enumerate(zip(es.items, sr[(es.name, col.name)])):
            if path:
                pairs.append((path, item.hr_path))
                where.append((es.name, col.name, j))
    group_keys, groups = [], []  # set-level metrics (FID): each column's outputs against the set's HR images
    if any(METRICS[m].set_level for m in ev.metrics):
        for es, col in keys:
            if es.paired:
                group_keys.append((es.name, col.name))
                groups.append(([p for p in sr[(es.name, col.name)] if p], [i.hr_path for i in es.items if i.hr_path]))
    t1 = time.perf_counter()
    scored, set_values = _score(cfg, pairs, groups)
    metrics_s = time.perf_counter() - t1
    per_image: Dict[Tuple[str, str, int], Dict[str, Optional[float]]] = dict(zip(where, scored.values))
    per_set = dict(zip(group_keys, set_values))

    blocks, notes = _tabulate(cfg, sets, columns, sr, records, per_image, scored, per_set)
    directions = {m: METRICS[m].higher_better for m in ev.metrics}
    directions.update(COT_HIGHER_BETTER)
    (out / "table.md").write_text(markdown(blocks, directions, notes))
    (out / "table.csv").write_text(to_csv(blocks))
    _write_per_image(out / "per_image.csv", sets, columns, per_image, records,
                     [m for m in ev.metrics if not METRICS[m].set_level])
    sheets = _comparison_sheets(cfg, sets, columns, sr, out / "grids")
    images = sum(len(es.items) for es in sets)
    summary = {"out_dir": str(out), "sets": {es.name: {"images": len(es.items), "paired": es.paired,
                                                        "skipped": es.skipped} for es in sets},
               "columns": [c.name for c in columns], "generate_s": generate_s, "metrics_s": metrics_s,
               "generate_s_by_column": gen_s, "scored_pairs": len(pairs), "num_workers": ev.num_workers,
               "images": images, "metric_status": {k: vars(v) for k, v in scored.status.items()},
               "missing_outputs": sum(1 for v in sr.values() for p in v if p is None),
               "table": {f"{b.dataset}/{c}/{r.key}": (None if not isinstance(b.cells.get((r.key, c)), (int, float))
                                                       else float(b.cells[(r.key, c)]))
                         for b in blocks for r in b.rows for c in b.columns}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _track(cfg, summary, out, sheets)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))  # now with the MLflow run
    return summary


def _mean(vals: Sequence[Optional[float]]) -> Optional[float]:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _tabulate(cfg, sets, columns, sr, records, per_image, scored, per_set) -> Tuple[List[Block], List[str]]:
    ev = cfg.eval
    notes: List[str] = []
    labels = {m: f"{scored.status[m].label if m in scored.status else METRICS[m].label}{METRICS[m].arrow}"
              for m in ev.metrics}
    for m in ev.metrics:
        st = scored.status.get(m)
        if st is not None and not st.available:
            notes.append(f"{METRICS[m].label}: unavailable, {st.reason}")
        elif st is not None and st.reason:
            notes.append(f"{st.label}: {st.reason}")
    if scored.unreadable:
        path, why = scored.unreadable[0]
        notes.append(f"{len(scored.unreadable)} images could not be read and were not scored (first: {path}: {why})")
    if scored.resized:
        notes.append(f"{scored.resized} outputs were bicubic-resized to their HR image's size before scoring")
    if ev.crop_border:
        notes.append(f"PSNR/SSIM on the Y channel with {ev.crop_border} border pixels cropped")
    blocks = []
    for es in sets:
        rows = [Row(m, labels[m], 2 if m in ("psnr", "niqe", "musiq", "fid") else 4) for m in ev.metrics]
        rows += [Row(k, COT_LABELS[k], 3) for k in COT_METRICS]
        b = Block(es.name, es.paired, len(es.items), rows, [c.name for c in columns])
        for col in columns:
            paths = sr[(es.name, col.name)]
            missing = sum(p is None for p in paths)
            if missing:
                notes.append(f"{es.name}/{col.name}: {missing} of {len(paths)} images have no output (not scored)")
            for m in ev.metrics:
                st = scored.status.get(m)
                if st is not None and not st.available:
                    b.cells[(m, col.name)] = UNAVAILABLE
                elif METRICS[m].full_reference and not es.paired:
                    b.cells[(m, col.name)] = NOT_APPLICABLE
                elif METRICS[m].set_level:
                    v = per_set.get((es.name, col.name), {}).get(m)
                    b.cells[(m, col.name)] = NOT_APPLICABLE if v is None else v
                    if v is None:
                        notes.append(f"{es.name}/{col.name}: no {METRICS[m].label} (it needs at least 2 images on "
                                     "each side, or it failed: see the log)")
                else:
                    b.cells[(m, col.name)] = _mean([per_image.get((es.name, col.name, j), {}).get(m)
                                                    for j in range(len(es.items))])
            recs = records.get((es.name, col.name))
            for k in COT_METRICS:
                if recs is None:
                    b.cells[(k, col.name)] = NOT_APPLICABLE
                    continue
                missing_value = {"strict_format": 0.0, "fallback_rate": 1.0}.get(k)  # no output: no format, all fallback
                vals = [grade(r, i.labels, i.tags)[k] if r else missing_value for r, i in zip(recs, es.items)]
                v = _mean(vals)
                b.cells[(k, col.name)] = v if v is not None else NOT_APPLICABLE
        blocks.append(b)
        if es.skipped:
            notes.append(f"{es.name}: {len(es.skipped)} inputs skipped (first: {es.skipped[0][0]}: {es.skipped[0][1]})")
    return blocks, notes


def _write_per_image(path: Path, sets, columns, per_image, records, metrics: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "column", "image", *metrics, *COT_METRICS])
        for es in sets:
            for col in columns:
                recs = records.get((es.name, col.name))
                for j, item in enumerate(es.items):
                    vals = per_image.get((es.name, col.name, j), {})
                    cot = grade(recs[j], item.labels, item.tags) if recs and recs[j] else {}
                    w.writerow([es.name, col.name, item.id, *["" if vals.get(m) is None else vals[m] for m in metrics],
                                *["" if cot.get(k) is None else cot[k] for k in COT_METRICS]])


def _comparison_sheets(cfg, sets, columns, sr, out: Path) -> List[Path]:
    written = []
    for es in sets:
        for j, item in enumerate(es.items[: cfg.eval.grid_images]):
            cells: List[Optional[Image.Image]] = [open_image(item.lr_path)[0]]
            labels = ["LR"]
            for col in columns:
                p = sr[(es.name, col.name)][j]
                cells.append(open_image(p)[0] if p else None)
                labels.append(col.name)
            if item.hr_path:
                cells.append(open_image(item.hr_path)[0])
                labels.append("HR")
            f = out / f"{es.name}_{item.id}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            comparison_row(cells, labels).save(f)
            written.append(f)
    return written


def _track(cfg, summary: Dict[str, Any], out: Path, sheets: List[Path]) -> None:
    tr = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name or "eval", cfg.run_dir)
    try:
        tr.params({"eval.columns": ",".join(summary["columns"]), "eval.sets": ",".join(summary["sets"]),
                   "eval.metrics": ",".join(cfg.eval.metrics), "eval.weights_dir": cfg.eval.weights_dir,
                   "eval.num_workers": cfg.eval.num_workers, "infer.mode": cfg.infer.mode})
        tr.metrics({f"eval/{k}": v for k, v in summary["table"].items() if v is not None and math.isfinite(v)}, step=0)
        tr.metrics({"eval/generate_s": summary["generate_s"], "eval/metrics_s": summary["metrics_s"]}, step=0)
        for name in ("table.md", "table.csv", "per_image.csv", "summary.json"):
            tr.artifact(str(out / name))
        for g in sheets:
            tr.artifact(str(g), "grids")
    finally:
        tr.close()
    summary["mlflow_uri"], summary["mlflow_run_id"] = tr.uri, tr.run_id
