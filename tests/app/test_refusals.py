"""Issue 27, refusals: every command, given the bad inputs a new user is likely to give (a path
that does not exist, an empty folder, a file where a folder is expected, a folder of the wrong
kind, malformed YAML or JSON, a checkpoint of another architecture), ends in one line naming
the offending thing, exit code 2 and no traceback; a real bug still raises.

The commands run in this process (`app.cli.main`) and must refuse at their checks: nothing
here starts Ray, loads a model's weights or trains. Two cases run the real entry point as a
subprocess, to prove that path prints no traceback either.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from cluster.config import REPO_ROOT


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_policy, tiny_vq):
    """Bad inputs of every kind, and one good run folder (policy/ and vq/) for the commands
    whose other arguments are the bad ones."""
    root = tmp_path_factory.mktemp("bad")
    b = SimpleNamespace(root=root, missing=root / "nowhere", empty=root / "empty", file=root / "notes.txt",
                        notimg=root / "spreadsheets", photos=root / "photos", badsidecar=root / "badsidecar",
                        bad_yaml=root / "bad.yaml", list_yaml=root / "list.yaml", llama=root / "llama",
                        badjson=root / "badjson", noweights=root / "noweights", bad_manifest=root / "bad.jsonl",
                        badfield_manifest=root / "badfield.jsonl",
                        empty_manifest=root / "empty.jsonl", run=root / "run", full=root / "full",
                        badvq=root / "badvq", unpaired=root / "unpaired")
    b.empty.mkdir()
    b.file.write_text("not an image\n")
    b.notimg.mkdir()
    (b.notimg / "a.csv").write_text("x,y\n")
    (b.notimg / "b.txt").write_text("hello\n")
    rng = np.random.default_rng(0)
    for folder in (b.photos, b.badsidecar):
        folder.mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (b.badsidecar / "p0.json").write_text("{not json")
    b.unpaired.mkdir()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(b.unpaired / "other.png")
    b.bad_yaml.write_text("image: [1, 2\nrun_dir: :\n")
    b.list_yaml.write_text("- image\n- vq\n")
    b.llama.mkdir()
    (b.llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                     "hidden_size": 64}))
    b.badjson.mkdir()
    (b.badjson / "config.json").write_text("{oops")
    tiny_policy.save(b.run / "policy")
    tiny_vq.save(b.run / "vq")
    b.policy, b.vq = b.run / "policy", b.run / "vq"
    b.noweights.mkdir()
    (b.noweights / "config.json").write_text((b.policy / "config.json").read_text())
    good_row = {"id": "a_v0", "source": "a.png", "hr_path": "hr/a.png", "lr_path": "lr/a_v0.png", "hr_size": 128,
                "hr_usm": False, "lr_size": 32, "seed": 1, "crop": [0, 0, 96], "captions": None, "tags": [],
                "degradation": {"labels": ["none", "keep", "none", "none", "keep"], "text": "t", "params": {}},
                "notes": []}
    b.bad_manifest.write_text(json.dumps(good_row) + '\n{"hr_path": \n')  # row 1 a record, row 2 not JSON
    b.badfield_manifest.write_text(json.dumps(good_row) + "\n" + json.dumps(dict(good_row, seed="1")) + "\n")
    b.empty_manifest.write_text("")
    b.badvq.mkdir()
    (b.badvq / "vq_config.json").write_text('{"codebook_size": 16, "colours": 3}')
    b.full.mkdir()
    (b.full / "keep.txt").write_text("x")
    return b


@pytest.fixture
def nothing_starts(monkeypatch):
    """Starting Ray, the trainer's actors or an eval job fails the test: a refusal comes first.
    (Ray itself may be up already, left by another test module.)"""
    import training.driver
    import app.eval_job
    import training.jobs

    def started(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    for owner, name in ((training.jobs, "start_ray"), (training.driver, "start_ray"),
                        (training.driver.GRPOTrainer, "_start_actors"), (app.eval_job, "run_eval_job")):
        monkeypatch.setattr(owner, name, started)


def refuses(capsys, argv, offending) -> str:
    """`argv` ends in exit code 2 with one line on stderr, `realsr-r1 <command>: ...`, that
    names `offending`; no traceback anywhere. Returns the line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"realsr-r1 {argv[0]}: "), lines[0]
    assert str(offending) in lines[0], (str(offending), lines[0])
    return lines[0]


# ---- each command with its likely bad inputs ------------------------------------------------------
# (id, argv builder, what the line must name); `b` is the `bad` fixture
SHOW_CONFIG = [
    ("config-missing", lambda b: ["--config", b.missing / "x.yaml"], lambda b: b.missing / "x.yaml"),
    ("config-is-a-folder", lambda b: ["--config", b.empty], lambda b: b.empty),
    ("config-not-yaml", lambda b: ["--config", b.bad_yaml], lambda b: b.bad_yaml),
    ("config-a-list", lambda b: ["--config", b.list_yaml], lambda b: b.list_yaml),
    ("override-not-yaml", lambda b: ["image.hr_size=[64"], lambda b: "image.hr_size=[64"),
]


@pytest.mark.parametrize("case", SHOW_CONFIG, ids=[c[0] for c in SHOW_CONFIG])
def test_show_config_refuses(bad, capsys, case):
    _, argv, offending = case
    refuses(capsys, ["show-config", *argv(bad)], offending(bad))


@pytest.mark.parametrize("argv,offending", [
    (lambda b: ["--config", b.bad_yaml], lambda b: b.bad_yaml),
    (lambda b: [f"envs.iqa_python={b.missing / 'python'}"], lambda b: b.missing / "python"),
], ids=["config-not-yaml", "iqa-python-missing"])
def test_check_env_refuses(bad, capsys, argv, offending):
    refuses(capsys, ["check-env", *argv(bad)], offending(bad))


PREPARE_DATA = [
    ("input-missing", lambda b: ["--input", b.missing], lambda b: b.missing),
    ("input-is-a-file", lambda b: ["--input", b.file], lambda b: b.file),
    ("input-empty", lambda b: ["--input", b.empty], lambda b: b.empty),
    ("input-no-images", lambda b: ["--input", b.notimg], lambda b: b.notimg),
    ("no-sidecars-required", lambda b: ["--input", b.photos, "data.require_annotations=true"],
     lambda b: b.photos / "p0.png"),
    ("malformed-sidecar-required", lambda b: ["--input", b.badsidecar, "data.require_annotations=true"],
     lambda b: "p0.json"),
    ("out-is-a-file", lambda b: ["--input", b.photos, "--out", b.file], lambda b: b.file),
    ("config-not-yaml", lambda b: ["--config", b.bad_yaml], lambda b: b.bad_yaml),
]


@pytest.mark.parametrize("case", PREPARE_DATA, ids=[c[0] for c in PREPARE_DATA])
def test_prepare_data_refuses(bad, capsys, tmp_path, case):
    _, argv, offending = case
    args = argv(bad)
    out = [] if "--out" in args else ["--out", tmp_path / "data"]
    refuses(capsys, ["prepare-data", "--no-progress", *out, *args], offending(bad))
    assert not (tmp_path / "data" / "manifest.jsonl").exists()


def test_require_annotations_names_every_image_on_one_line(bad, capsys, tmp_path):
    line = refuses(capsys, ["prepare-data", "--input", bad.photos, "--out", tmp_path, "data.require_annotations=true"],
                   bad.photos / "p1.png")
    assert "2 of 2 images" in line and "data.require_annotations=false" in line


ANNOTATE = [
    ("input-missing", lambda b: ["--input", b.missing], lambda b: b.missing),
    ("input-empty", lambda b: ["--input", b.empty], lambda b: b.empty),
    ("input-no-images", lambda b: ["--input", b.notimg], lambda b: b.notimg),
    ("captioner-missing", lambda b: ["--input", b.photos, f"annotate.captioner={b.missing}"], lambda b: b.missing),
    ("captioner-a-llama", lambda b: ["--input", b.photos, f"annotate.captioner={b.llama}"], lambda b: b.llama),
    ("captioner-bad-json", lambda b: ["--input", b.photos, f"annotate.captioner={b.badjson}"], lambda b: b.badjson),
]


@pytest.mark.parametrize("case", ANNOTATE, ids=[c[0] for c in ANNOTATE])
def test_annotate_refuses(bad, capsys, case):
    _, argv, offending = case
    refuses(capsys, ["annotate", "--no-progress", *argv(bad)], offending(bad))
    assert not list(bad.photos.glob("*.json"))


INIT_POLICY = [
    ("out-is-a-file", lambda b, t: ["--out", b.file], lambda b: b.file),
    ("out-under-a-file", lambda b, t: ["--out", b.file / "sub"], lambda b: b.file),
    ("checkpoint-a-llama", lambda b, t: ["--out", t, f"policy.checkpoint={b.llama}"], lambda b: b.llama),
    ("checkpoint-bad-json", lambda b, t: ["--out", t, f"policy.checkpoint={b.badjson}"], lambda b: b.badjson),
    ("checkpoint-without-weights", lambda b, t: ["--out", t, f"policy.checkpoint={b.noweights}"],
     lambda b: b.noweights),
    ("checkpoint-missing", lambda b, t: ["--out", t, f"policy.checkpoint={b.missing}"], lambda b: b.missing),
    ("vq-empty-folder", lambda b, t: ["--out", t, f"vq.checkpoint={b.empty}"], lambda b: b.empty),
]


@pytest.mark.parametrize("case", INIT_POLICY, ids=[c[0] for c in INIT_POLICY])
def test_init_policy_refuses(bad, capsys, tmp_path, case):
    _, argv, offending = case
    refuses(capsys, ["init-policy", *argv(bad, tmp_path / "out")], offending(bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,offending", [
    (lambda b: ["--out", b.full], lambda b: b.full),
    (lambda b: ["--out", b.file], lambda b: b.file),
    (lambda b: ["--out", b.root / "new", "--config", b.bad_yaml], lambda b: b.bad_yaml),
], ids=["out-not-empty", "out-is-a-file", "config-not-yaml"])
def test_train_vq_refuses_before_training(bad, capsys, argv, offending):
    refuses(capsys, ["train-vq", *argv(bad)], offending(bad))


IMPORT_POLICY = [
    ("src-missing", lambda b: ["--src", b.missing], lambda b: b.missing),
    ("src-is-a-file", lambda b: ["--src", b.file], lambda b: b.file),
    ("src-empty", lambda b: ["--src", b.empty], lambda b: b.empty),
    ("src-a-llama", lambda b: ["--src", b.llama], lambda b: b.llama),
    ("src-bad-json", lambda b: ["--src", b.badjson], lambda b: b.badjson),
    ("tokenizer-missing", lambda b: ["--src", b.policy, "--tokenizer", b.missing / "t.json"],
     lambda b: b.missing / "t.json"),
]


@pytest.mark.parametrize("case", IMPORT_POLICY, ids=[c[0] for c in IMPORT_POLICY])
def test_import_policy_refuses(bad, capsys, tmp_path, case):
    _, argv, offending = case
    line = refuses(capsys, ["import-policy", *argv(bad), "--out", tmp_path / "out"], offending(bad))
    assert "refused, nothing written" in line and not (tmp_path / "out").exists()


def test_import_policy_refuses_an_out_that_is_a_file(bad, capsys):
    refuses(capsys, ["import-policy", "--src", bad.policy, "--out", bad.file], bad.file)


def in_run_dir(args, tmp_path):
    """`args` with run_dir set to `tmp_path` unless a case names its own."""
    return args if any(str(a).startswith("run_dir=") for a in args) else [f"run_dir={tmp_path}", *args]


# sft and train name every manifest so no case prepares data; each is refused before Ray starts
SFT = [
    ("manifest-missing", lambda b: [f"data.sft_manifest={b.missing / 'm.jsonl'}"], lambda b: b.missing / "m.jsonl"),
    ("manifest-is-a-folder", lambda b: [f"data.sft_manifest={b.empty}"], lambda b: b.empty),
    ("manifest-bad-json", lambda b: [f"data.sft_manifest={b.bad_manifest}"], lambda b: f"{b.bad_manifest}:2"),
    ("manifest-empty", lambda b: [f"data.sft_manifest={b.empty_manifest}"], lambda b: b.empty_manifest),
    ("manifest-bad-field", lambda b: [f"data.sft_manifest={b.badfield_manifest}"],
     lambda b: f"{b.badfield_manifest}:2: 'seed' is a JSON string, not integer"),
    ("checkpoint-a-llama", lambda b: [f"data.sft_manifest={b.empty_manifest}", f"policy.checkpoint={b.llama}"],
     lambda b: b.llama),
    ("run-dir-is-a-file", lambda b: [f"run_dir={b.file}"], lambda b: b.file),
    ("out-is-a-file", lambda b: ["--out", b.file], lambda b: b.file),
]


@pytest.mark.parametrize("case", SFT, ids=[c[0] for c in SFT])
def test_sft_refuses_before_ray(bad, capsys, tmp_path, nothing_starts, case):
    _, argv, offending = case
    refuses(capsys, ["sft", "--no-progress", *in_run_dir(argv(bad), tmp_path)], offending(bad))


TRAIN = [
    ("rl-manifest-missing", lambda b: [f"data.rl_manifest={b.missing / 'm.jsonl'}"], lambda b: b.missing / "m.jsonl"),
    ("rl-manifest-bad-json", lambda b: [f"data.rl_manifest={b.bad_manifest}"], lambda b: f"{b.bad_manifest}:2"),
    ("rl-manifest-empty", lambda b: [f"data.rl_manifest={b.empty_manifest}"], lambda b: b.empty_manifest),
    ("rl-manifest-bad-field", lambda b: [f"data.rl_manifest={b.badfield_manifest}"],
     lambda b: f"{b.badfield_manifest}:2: 'seed'"),
    ("sft-manifest-missing", lambda b: [f"data.sft_manifest={b.missing / 's.jsonl'}"], lambda b: b.missing / "s.jsonl"),
    ("resume-without-checkpoint", lambda b: ["--resume", "trainer.sft=false"], lambda b: "checkpoints"),
    ("checkpoint-a-llama", lambda b: [f"policy.checkpoint={b.llama}"], lambda b: b.llama),
    ("run-dir-is-a-file", lambda b: [f"run_dir={b.file}"], lambda b: b.file),
    ("config-not-yaml", lambda b: ["--config", b.bad_yaml], lambda b: b.bad_yaml),
]


@pytest.mark.parametrize("case", TRAIN, ids=[c[0] for c in TRAIN])
def test_train_refuses_before_any_actor_starts(bad, capsys, tmp_path, nothing_starts, case):
    _, argv, offending = case
    args = argv(bad)
    line = refuses(capsys, ["train", "--no-progress", *in_run_dir(args, tmp_path)], offending(bad))
    if "--resume" in args:
        assert str(tmp_path) in line


@pytest.mark.parametrize("argv,offending", [
    (lambda b: ["--runtime-env-json", "{pip"], lambda b: "{pip"),
    (lambda b: ["--runtime-env-json", "[1, 2]"], lambda b: "[1, 2]"),
    (lambda b: ["--runtime-env-json", '{"env_vars": ["A=1"]}'], lambda b: "env_vars"),
    (lambda b: ["--config", b.missing / "c.yaml"], lambda b: b.missing / "c.yaml"),
    (lambda b: ["--config", b.bad_yaml], lambda b: b.bad_yaml),
], ids=["env-json-not-json", "env-json-a-list", "env-vars-a-list", "config-missing", "config-not-yaml"])
def test_submit_refuses(bad, capsys, tmp_path, argv, offending):
    refuses(capsys, ["submit", "--dry-run", *argv(bad), f"run_dir={tmp_path}"], offending(bad))


INFER = [
    ("checkpoint-missing", lambda b: ["--checkpoint", b.missing, "--image", b.photos], lambda b: b.missing),
    ("checkpoint-is-a-file", lambda b: ["--checkpoint", b.file, "--image", b.photos], lambda b: b.file),
    ("checkpoint-empty", lambda b: ["--checkpoint", b.empty, "--image", b.photos], lambda b: b.empty),
    ("checkpoint-a-llama", lambda b: ["--checkpoint", b.llama, "--image", b.photos, "--vq", b.vq], lambda b: b.llama),
    ("checkpoint-bad-json", lambda b: ["--checkpoint", b.badjson, "--image", b.photos, "--vq", b.vq],
     lambda b: b.badjson),
    ("checkpoint-without-weights", lambda b: ["--checkpoint", b.noweights, "--image", b.photos, "--vq", b.vq],
     lambda b: b.noweights),
    ("vq-missing", lambda b: ["--checkpoint", b.policy, "--image", b.photos, "--vq", b.missing], lambda b: b.missing),
    ("vq-not-a-vq-config", lambda b: ["--checkpoint", b.policy, "--image", b.photos, "--vq", b.badvq],
     lambda b: b.badvq / "vq_config.json"),
    ("image-missing", lambda b: ["--checkpoint", b.policy, "--image", b.missing / "a.png"],
     lambda b: b.missing / "a.png"),
    ("image-folder-empty", lambda b: ["--checkpoint", b.policy, "--image", b.empty], lambda b: b.empty),
    ("image-folder-no-images", lambda b: ["--checkpoint", b.policy, "--image", b.notimg], lambda b: b.notimg),
    ("image-not-an-image", lambda b: ["--checkpoint", b.policy, "--image", b.file], lambda b: b.file),
    ("out-is-a-file", lambda b: ["--checkpoint", b.policy, "--image", b.photos, "--out", b.file], lambda b: b.file),
    ("config-not-yaml", lambda b: ["--checkpoint", b.policy, "--image", b.photos, "--config", b.bad_yaml],
     lambda b: b.bad_yaml),
]


@pytest.mark.parametrize("case", INFER, ids=[c[0] for c in INFER])
def test_infer_refuses_before_the_model_loads(bad, capsys, tmp_path, case):
    _, argv, offending = case
    args = argv(bad)
    out = [] if "--out" in args else ["--out", tmp_path / "sr"]
    refuses(capsys, ["infer", "--no-progress", *out, *args], offending(bad))
    assert not (tmp_path / "sr").exists()


EVAL = [
    ("checkpoint-missing", lambda b: ["--checkpoint", b.missing], lambda b: b.missing),
    ("checkpoint-a-llama", lambda b: ["--checkpoint", b.llama, "--vq", b.vq], lambda b: b.llama),
    ("data-missing", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.missing}"], lambda b: b.missing),
    ("data-empty", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.empty}"], lambda b: b.empty),
    ("data-no-images", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.notimg}"], lambda b: b.notimg),
    ("data-hr-missing", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.photos},{b.missing}"],
     lambda b: b.missing),
    ("data-no-pairs", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.photos},{b.unpaired}"],
     lambda b: b.unpaired),
    ("manifest-bad-json", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.bad_manifest}"],
     lambda b: f"{b.bad_manifest}:2"),
    ("manifest-missing", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.missing / 'm.jsonl'}"],
     lambda b: b.missing / "m.jsonl"),
    ("manifest-empty", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.empty_manifest}"],
     lambda b: b.empty_manifest),
    ("manifest-bad-field", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.badfield_manifest}"],
     lambda b: f"{b.badfield_manifest}:2: 'seed'"),
    ("sr-missing", lambda b: ["--sr", f"other={b.missing}"], lambda b: b.missing),
    ("out-is-a-file", lambda b: ["--checkpoint", b.policy, "--data", f"x={b.photos}", "--out", b.file],
     lambda b: b.file),
]


@pytest.mark.parametrize("case", EVAL, ids=[c[0] for c in EVAL])
def test_eval_refuses_before_anything_runs(bad, capsys, tmp_path, nothing_starts, case):
    _, argv, offending = case
    refuses(capsys, ["eval", "--no-progress", *argv(bad), f"run_dir={tmp_path}"], offending(bad))
    assert not (tmp_path / "eval").exists()


PREPARE_EVAL = [
    ("synthetic-missing", lambda b: ["--synthetic", b.missing], lambda b: b.missing),
    ("synthetic-is-a-file", lambda b: ["--synthetic", b.file], lambda b: b.file),
    ("synthetic-empty", lambda b: ["--synthetic", b.empty], lambda b: b.empty),
    ("synthetic-no-images", lambda b: ["--synthetic", b.notimg], lambda b: b.notimg),
    ("paired-lr-missing", lambda b: ["--paired", f"{b.missing},{b.photos}"], lambda b: b.missing),
    ("paired-hr-empty", lambda b: ["--paired", f"{b.photos},{b.empty}"], lambda b: b.empty),
    ("paired-one-folder", lambda b: ["--paired", b.photos], lambda b: b.photos),
]


@pytest.mark.parametrize("case", PREPARE_EVAL, ids=[c[0] for c in PREPARE_EVAL])
def test_prepare_eval_refuses(bad, capsys, tmp_path, case):
    _, argv, offending = case
    refuses(capsys, ["prepare-eval", *argv(bad), "--out", tmp_path / "set"], offending(bad))
    assert not (tmp_path / "set").exists()


def test_prepare_eval_refuses_an_out_that_is_a_file(bad, capsys):
    refuses(capsys, ["prepare-eval", "--synthetic", bad.photos, "--out", bad.file], bad.file)


# ---- the boundary: a bug is not a refusal; the console entry point prints no traceback ---------------
def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only UserError is a refusal: a plain ValueError (or anything else) from inside a command
    propagates, traceback and all."""
    import app.cli

    def broken(cfg):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(app.cli, "to_yaml", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["show-config"])


@pytest.mark.parametrize("argv,offending", [
    (lambda b: ["show-config", "--config", b.bad_yaml], lambda b: b.bad_yaml),
    (lambda b: ["prepare-data", "--input", b.photos, "--out", b.root / "pd", "data.require_annotations=true"],
     lambda b: b.photos / "p0.png"),
], ids=["malformed-yaml", "require-annotations"])
def test_the_entry_point_prints_one_line_and_exits_2(bad, argv, offending):
    proc = subprocess.run([sys.executable, "-m", "app.cli", *map(str, argv(bad))], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"realsr-r1 {argv(bad)[0]}: ") and str(offending(bad)) in lines[0]
