"""`realsr-r1` command line.

Every subcommand takes `--config FILE` (default: configs/tiny-cpu.yaml) and `key=value`
overrides, and validates the whole configuration before doing any work. A mistake in what the
user gave (vlcot/errors.py `UserError`) is one line on stderr (a config with several problems:
one line each) and exit code 2; a traceback is a bug.

    realsr-r1 annotate --input DIR [--overwrite]          captions + tags sidecars with local models
    realsr-r1 prepare-data [--config F] [key=value ...]   HQ images -> LR, labels, manifest
    realsr-r1 init-policy --out DIR [...]                 write the tiny policy + VQ tokenizer
    realsr-r1 train-vq --out DIR [vq_train.key=value ...]  train the demo VQ tokenizer on bundled photographs
    realsr-r1 import-policy --src DIR --out DIR           convert a released PURE / Lumina-mGPT folder once
    realsr-r1 sft [...]                                   cold-start SFT on traces built from the manifest
    realsr-r1 train [--resume] [...]                      GRPO (after cold-start SFT) on a local or joined Ray
    realsr-r1 submit [--address URL] [...]                the same training as a `ray job submit` job
    realsr-r1 infer --checkpoint DIR --image IN [--out DIR]   super-resolve an image or a folder
    realsr-r1 eval --checkpoint DIR [...] [--data NAME=LR[,HR]]  Table-1 metrics, CoT quality, grids
    realsr-r1 prepare-eval (--paired LR,HR | --synthetic HR) --out DIR   test sets in the paper's layout
    realsr-r1 check-env [--ray]                           what each Python environment holds
    realsr-r1 show-config [...]                           print the resolved configuration
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from app.eval_inputs import Column, builtin_set, load_set
from app.eval_job import run_eval_job
from app.infer_job import named_path, pick_config_path, resolve_checkpoints, run_infer_job, summary_line
from app.submit import build_submit_command, run_submit, runtime_env_arg
from cluster.config import load_config, to_yaml
from cluster.interpreters import cuda_report, iqa_python, probe_environment
from evaluation.eval_sets import paired_set, synthetic_set
from training.jobs import build_initial_policy, run_sft_job
from training.tracking import lost_line
from vlcot.annotate import annotate_folder
from vlcot.data import prepare_data
from vlcot.errors import BadPath, UserError, existing_folder, output_folder


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realsr-r1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=None, help="yaml config (default: configs/tiny-cpu.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.input_dir=/photos")
        return sp

    sp = add("prepare-data", "turn a folder of HQ images (default: the built-in set) into LR images, labels and a manifest")
    sp.add_argument("--input", default=None, help="folder of HQ images (same as data.input_dir=...)")
    sp.add_argument("--out", default=None, help="output folder (same as data.output_dir=...)")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("init-policy", "build the configured policy and VQ tokenizer and save them (HF layout)")
    sp.add_argument("--out", required=True)
    sp = add("train-vq", "train the configured VQ architecture on CPU from photographs bundled with the dependencies "
             "(vq_train.*); point vq.checkpoint at the folder it writes")
    sp.add_argument("--out", required=True, help="new folder: vq_config.json, vq_model.safetensors, training.json")
    sp = add("import-policy", "convert a released PURE / Lumina-mGPT checkpoint folder into this project's HF layout")
    sp.add_argument("--src", required=True, help="the downloaded folder (config.json, safetensors shards, tokenizer file)")
    sp.add_argument("--out", required=True, help="new folder for the converted policy (point policy.checkpoint here)")
    sp.add_argument("--tokenizer", default=None, help="tokenizer JSON naming the image codes (default: "
                    "<src>/text_tokenizer.json, then <src>/tokenizer.json)")
    sp.add_argument("--shard-mb", type=int, default=4096, help="output shard size in MB")
    sp = add("sft", "cold-start SFT of the policy on VLCoT traces synthesised from the manifest")
    sp.add_argument("--out", default=None, help="checkpoint folder (default: <run_dir>/sft)")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("train", "GRPO training (cold-start SFT first): the main job")
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run_dir")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("submit", "submit `realsr-r1 train` to a Ray cluster with `ray job submit`")
    sp.add_argument("--address", default="http://127.0.0.1:8265")
    sp.add_argument("--dry-run", action="store_true", help="print the command only")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--python", default="python",
                    help="the interpreter on the cluster's nodes that has this project installed (default: "
                         "`python` on the head node's PATH)")
    sp.add_argument("--runtime-env-json", default=None,
                    help='Ray runtime-env fields for the job, e.g. \'{"image_uri": "...", "env_vars": {...}}\'')
    sp = add("infer", "super-resolve one image or a folder with a checkpoint")
    sp.add_argument("--checkpoint", required=True, help="HF policy folder, learner checkpoint (hf/) or run folder")
    sp.add_argument("--image", required=True, help="an image file or a folder of images")
    sp.add_argument("--out", default=None, help="output folder (default: <run_dir>/infer)")
    sp.add_argument("--vq", default=None, help="VQ tokenizer folder (default: the nearest vq/ above the checkpoint)")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("eval", "score test sets the way the paper's Table 1 does (one column per checkpoint)")
    sp.add_argument("--checkpoint", action="append", default=[], help="[NAME=]DIR, repeatable")
    sp.add_argument("--data", action="append", default=[],
                    help="NAME=LR_DIR[,HR_DIR] or NAME=manifest.jsonl, repeatable (default: the built-in set)")
    sp.add_argument("--sr", action="append", default=[], help="NAME=DIR of another method's outputs (by file stem)")
    sp.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline column")
    sp.add_argument("--vq", default=None)
    sp.add_argument("--out", default=None, help="output folder (same as eval.out_dir=...)")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("annotate", "write captions and tags (<stem>.json sidecars) for a folder of photographs with local "
             "models (annotate.captioner, annotate.detector)")
    sp.add_argument("--input", required=True, help="the folder prepare-data will read (data.input_dir)")
    sp.add_argument("--overwrite", action="store_true", help="redo images that already have a sidecar")
    sp.add_argument("--no-progress", action="store_true")
    sp = add("prepare-eval", "build a test set in the paper's layout: centre-cropped LR/HR pairs from two folders, "
             "or a synthetic (OST-Val-like) set degraded from HR images with a fixed seed")
    sp.add_argument("--paired", default=None, metavar="LR_DIR,HR_DIR", help="match by stem (_HR/_LR4/x4 suffixes dropped)")
    sp.add_argument("--synthetic", default=None, metavar="HR_DIR", help="degrade these HR images (degradation.*)")
    sp.add_argument("--out", required=True, help="new folder: lr/, hr/, summary.json, skipped.jsonl")
    sp.add_argument("--lr-size", type=int, default=128, help="LR crop side (the paper's comparisons: 128)")
    sp.add_argument("--scale", type=int, default=4, help="HR / LR size (HR crop = lr-size x scale)")
    sp.add_argument("--seed", type=int, default=None, help="synthetic: base seed (default: data.seed)")
    sp = add("check-env", "report the main and IQA environments and whether torch can use this node's GPUs "
                          "(exit 1 when the config's GPU roles could not; with --ray: the IQA env from a Ray actor)")
    sp.add_argument("--ray", action="store_true")
    add("show-config", "print the resolved configuration")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. A `UserError` (vlcot/errors.py: a mistake the user can fix) is one line on
    stderr (one per problem of a config) and exit code 2 wherever it is raised; anything else is a
    bug and keeps its traceback."""
    try:
        return _main(argv)
    except UserError as exc:
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        head, *more = exc.lines()  # more: the other problems of a config, one line each
        print("\n  ".join([f"{' '.join(['realsr-r1', command]).strip()}: {head}", *more]), file=sys.stderr)
        return 2


def _main(argv: Optional[List[str]]) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit after flags too (`train --resume learner.lr=1e-4 --no-progress ...`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if getattr(args, "input", None):
        existing_folder(args.input, "--input", "give a folder of photographs")
        overrides.append(f"data.input_dir={args.input}")
    if args.command == "prepare-data" and args.out:
        overrides.append(f"data.output_dir={args.out}")
    if args.command == "eval" and args.out:
        overrides.append(f"eval.out_dir={args.out}")
    if args.command == "import-policy":
        overrides.append("policy.checkpoint=''")  # the folder it is about to write need not exist yet
    config_path = args.config
    if args.command in ("infer", "eval"):
        ckpts = resolve_checkpoints(args.checkpoint if args.command == "eval" else [args.checkpoint], args.vq)
        if ckpts:
            config_path = pick_config_path(args.config, next(iter(ckpts.values())))
    cfg = load_config(config_path, overrides)

    if args.command == "show-config":
        print(to_yaml(cfg))
        return 0
    if args.command == "prepare-data":
        summary = prepare_data(cfg.image, cfg.degradation, cfg.data, progress=not args.no_progress)
        print(summary.render())
        return 0 if summary.samples else 1
    if args.command == "annotate":
        summary = annotate_folder(Path(args.input), cfg.annotate, cfg.image, cfg.data, cfg.degradation,
                                  overwrite=args.overwrite, progress=not args.no_progress)
        print(summary.render())
        return 0 if not summary.failed else 1
    if args.command == "prepare-eval":
        if bool(args.paired) == bool(args.synthetic) or (args.paired and "," not in args.paired):
            raise UserError("give exactly one of --paired LR_DIR,HR_DIR or --synthetic HR_DIR"
                            + (f" (--paired {args.paired} names one folder)" if args.paired and not args.synthetic
                               else ""))
        if args.lr_size < 1 or args.scale < 1:
            raise UserError(f"--lr-size {args.lr_size} and --scale {args.scale} must be >= 1")
        output_folder(args.out, "--out")
        if args.paired:
            lr_dir, hr_dir = args.paired.split(",", 1)
            summary = paired_set(Path(lr_dir), Path(hr_dir), Path(args.out), args.lr_size, args.scale)
        else:
            seed = cfg.data.seed if args.seed is None else args.seed
            summary = synthetic_set(Path(args.synthetic), Path(args.out), cfg.degradation, args.lr_size,
                                    args.scale, seed)
        print(summary.render())
        return 0 if summary.pairs else 1
    if args.command == "init-policy":
        from vlcot.vq import vq_from_config  # local: the VQ model loads diffusers (seconds), only here

        out = output_folder(args.out, "--out")
        vq = vq_from_config(cfg.vq)  # both loaded (or refused) before either is written
        if cfg.policy.checkpoint:  # a copy of the configured checkpoint, as the actors load it
            from vlcot.policy import load_policy  # local: transformers, only for a configured checkpoint

            load_policy(cfg.policy.checkpoint, cfg.policy, cfg.image, cfg.vq).save(out / "policy")
            print(f"policy -> {out / 'policy'}  (from {cfg.policy.checkpoint})")
        else:
            print(build_initial_policy(cfg, out / "policy"))
        vq.save(out / "vq")
        print(f"vq     -> {out / 'vq'}")
        return 0
    if args.command == "train-vq":
        from vlcot.vq_train import train_vq  # local: diffusers and transformers, only to train the VQ

        output_folder(args.out, "--out", empty=True)  # checked before the minutes of training
        print(train_vq(cfg.vq, cfg.vq_train, args.out).render())
        return 0
    if args.command == "import-policy":
        from vlcot.importer import import_policy  # local: transformers, only to import a released policy

        report = import_policy(args.src, args.out, codebook_size=cfg.vq.codebook_size,  # ImportRefused: one line
                               max_grid=cfg.policy.special_tokens.max_grid, patch_px=cfg.image.patch_px,
                               tokenizer_file=args.tokenizer, max_shard_bytes=args.shard_mb << 20)
        print(report.render())
        print(f"use it with: policy.checkpoint={args.out} (configs/pure-7b.yaml)")
        return 0
    if args.command == "sft":
        output_folder(cfg.run_dir, "run_dir")
        if args.out:
            output_folder(args.out, "--out")
        result = run_sft_job(cfg, args.out, progress=not args.no_progress)
        hist = result["history"]
        print(f"sft: {len(hist)} steps, loss {hist[0]['loss/sft']:.4f} -> {hist[-1]['loss/sft']:.4f}; "
              f"checkpoint {result['checkpoint']}")
        return 0
    if args.command == "train":
        from training.driver import GRPOTrainer  # local: Ray and the role actors, only to train

        output_folder(cfg.run_dir, "run_dir")
        summary = GRPOTrainer(cfg, resume=args.resume, progress=not args.no_progress).run()
        first, last = (f"{v:.3f}" if v is not None else "-" for v in (summary["first_20pct_mean"],
                                                                     summary["last_20pct_mean"]))
        print(f"train: {summary['steps']} GRPO steps, total reward first 20% {first} -> last 20% {last}, "
              f"{summary['wall_s']:.0f}s; MLflow {summary['mlflow_uri']} run {summary['mlflow_run_id']}"
              + lost_line(summary.get("tracking")))
        return 0
    if args.command == "submit":
        extra = runtime_env_arg(args.runtime_env_json) if args.runtime_env_json else None
        cmd = build_submit_command(cfg, args.config, list(args.overrides), args.address, args.resume, args.python,
                                   extra)
        print(" ".join(cmd))
        return 0 if args.dry_run else run_submit(cmd)
    if args.command == "infer":
        summary = run_infer_job(cfg, next(iter(ckpts.values())), args.image,
                                args.out or str(Path(cfg.run_dir) / "infer"), progress=not args.no_progress)
        print(summary_line(summary))
        return 0 if summary["written"] else 1
    if args.command == "eval":
        return _eval(cfg, args, ckpts)
    if args.command == "check-env":
        gpu_roles = cfg.learner.num_gpus > 0 or cfg.rollout.gpus_per_worker > 0 or cfg.rewards.num_gpus > 0
        report = {"main": probe_environment(), "iqa_python": iqa_python(cfg.envs), "cuda": cuda_report(gpu_roles)}
        if args.ray:
            from cluster.interpreter_probe import probe_iqa_env_in_ray  # local: Ray, only with --ray

            report["iqa"] = probe_iqa_env_in_ray(cfg.envs)
        print(json.dumps(report, indent=2))
        if not report["cuda"]["ok"]:  # this config's GPU roles would stop at start-up on this node
            print(f"realsr-r1: check-env: {report['cuda']['verdict']}", file=sys.stderr)
            return 1
        return 0
    return 2


def _eval(cfg, args, ckpts) -> int:
    if not ckpts and not args.sr:
        raise UserError("give at least one --checkpoint DIR or --sr NAME=DIR to score")
    columns = [Column(n, "checkpoint") for n in ckpts]
    for spec in args.sr:
        name, path = named_path(spec, "--sr")
        if not Path(path).is_dir():
            raise BadPath(f"--sr {spec}: {path} is not a folder: give NAME=DIR, the folder of another method's "
                          "outputs")
        if name in [c.name for c in columns]:
            raise UserError(f"--sr {spec}: the name {name!r} is taken; name it: OTHER={path}")
        columns.append(Column(name, "sr", path))
    output_folder(cfg.eval.out_dir or Path(cfg.run_dir) / "eval", "--out / eval.out_dir")
    sets = [load_set(s) for s in args.data] or [builtin_set(cfg)]  # a path without images is refused there
    for spec, es in zip(args.data or ["(the built-in set)"], sets):
        if not es.items:  # e.g. no LR image has an HR image of its stem
            why = f": {es.skipped[0][0]}: {es.skipped[0][1]}" if es.skipped else ""
            raise UserError(f"--data {spec}: no usable images{why}")
    if not args.no_bicubic:
        columns.append(Column("Bicubic", "bicubic"))
    summary = run_eval_job(cfg, sets, columns, ckpts, progress=not args.no_progress)
    print(Path(summary["out_dir"], "table.md").read_text())
    print(f"eval: {summary['images']} images x {len(columns)} columns; generation {summary['generate_s']:.1f}s, "
          f"metrics {summary['metrics_s']:.1f}s; results in {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
