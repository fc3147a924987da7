"""`prepare-eval`: paired crops on odd sizes and unmatched stems, and the seeded synthetic set."""

import json

import numpy as np
from PIL import Image

from app.cli import main
from evaluation.eval_sets import pair_key, paired_set, synthetic_set
from vlcot.config import DegradationConfig


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def paired_folders(root):
    lr, hr = root / "lr_in", root / "hr_in"
    lr.mkdir()
    hr.mkdir()
    noise(151, 133, 0).save(lr / "Canon_001_LR4.png")  # odd sizes: the crop is off-centre by one
    noise(604, 532, 1).save(hr / "Canon_001_HR.png")
    noise(140, 140, 2).save(lr / "lonely_a.png")
    noise(560, 560, 3).save(hr / "lonely_b.png")
    noise(100, 200, 4).save(lr / "small.png")  # shorter than the 128 crop
    noise(400, 800, 5).save(hr / "small.png")
    noise(140, 140, 6).save(lr / "wrong.png")  # x3, not x4
    noise(420, 420, 7).save(hr / "wrong.png")
    (lr / "broken.png").write_bytes(b"")
    noise(400, 400, 8).save(hr / "broken.png")
    return lr, hr


def test_pair_key_drops_the_resolution_suffix():
    assert [pair_key(s) for s in ("Canon_001_LR4", "Canon_001_HR", "img-x4", "a_lr", "b_hrx")] == \
        ["Canon_001", "Canon_001", "img", "a", "b_hrx"]


def test_paired_crops_align_and_every_other_file_has_a_reason(tmp_path):
    lr_dir, hr_dir = paired_folders(tmp_path)
    s = paired_set(lr_dir, hr_dir, tmp_path / "out")
    assert s.pairs == 1
    lr = np.asarray(Image.open(tmp_path / "out" / "lr" / "Canon_001.png"))
    hr = np.asarray(Image.open(tmp_path / "out" / "hr" / "Canon_001.png"))
    assert lr.shape == (128, 128, 3) and hr.shape == (512, 512, 3)
    src_lr = np.asarray(Image.open(lr_dir / "Canon_001_LR4.png"))
    src_hr = np.asarray(Image.open(hr_dir / "Canon_001_HR.png"))
    left, top = (151 - 128) // 2, (133 - 128) // 2  # 11, 2
    assert np.array_equal(lr, src_lr[top:top + 128, left:left + 128])
    assert np.array_equal(hr, src_hr[4 * top:4 * top + 512, 4 * left:4 * left + 512])  # the same scene region
    reasons = {json.loads(line)["file"].split("/")[-1]: json.loads(line)["reason"]
               for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()}
    assert reasons["lonely_a.png"].startswith("unmatched: no HR") and reasons["lonely_b.png"].startswith("unmatched: no LR")
    assert reasons["small.png"].startswith("too small") and reasons["wrong.png"].startswith("sizes not x4 apart")
    assert reasons["broken.png"].startswith("unreadable")
    assert sorted(p.name for p in (tmp_path / "out" / "lr").iterdir()) == ["Canon_001.png"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pairs"] == 1


def test_synthetic_set_is_seeded_and_labelled(tmp_path):
    hr_in = tmp_path / "hr_in"
    hr_in.mkdir()
    noise(700, 521, 0).save(hr_in / "scene.png")
    noise(300, 300, 1).save(hr_in / "tiny.png")
    cfg = DegradationConfig()
    a = synthetic_set(hr_in, tmp_path / "a", cfg, seed=5)
    synthetic_set(hr_in, tmp_path / "b", cfg, seed=5)
    synthetic_set(hr_in, tmp_path / "c", cfg, seed=6)
    assert a.pairs == 1 and [s["reason"].split(":")[0] for s in a.skipped] == ["too small"]
    read = lambda d: np.asarray(Image.open(tmp_path / d / "lr" / "scene.png"))  # noqa: E731
    assert read("a").shape == (128, 128, 3) and np.asarray(Image.open(tmp_path / "a" / "hr" / "scene.png")).shape[0] == 512
    assert np.array_equal(read("a"), read("b")) and not np.array_equal(read("a"), read("c"))
    side = json.loads((tmp_path / "a" / "lr" / "scene.json").read_text())
    # the recorded seed re-draws this very LR from the saved HR, and the labels are that draw's
    from vlcot.degradation import degrade, label_degradation

    hr = np.asarray(Image.open(tmp_path / "a" / "hr" / "scene.png"))
    lr, params = degrade(hr, (128, 128), cfg, side["seed"])
    assert np.array_equal(lr, read("a"))
    assert side["labels"] == label_degradation(params, cfg.thresholds)
    labels_c = json.loads((tmp_path / "c" / "lr" / "scene.json").read_text())
    assert labels_c["seed"] != side["seed"]


def test_cli_prepare_eval_then_eval_reads_the_layout(tmp_path, capsys):
    lr_dir, hr_dir = paired_folders(tmp_path)
    assert main(["prepare-eval", "--paired", f"{lr_dir},{hr_dir}", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "1 pairs" in out and f"--data NAME={tmp_path / 'p' / 'lr'},{tmp_path / 'p' / 'hr'}" in out
    from app.eval_inputs import load_set

    es = load_set(f"real={tmp_path / 'p' / 'lr'},{tmp_path / 'p' / 'hr'}")
    assert [(i.lr_path.split("/")[-1], i.hr_path.split("/")[-1]) for i in es.items] == [("Canon_001.png",) * 2]
    assert main(["prepare-eval", "--out", str(tmp_path / "x")]) == 2  # neither --paired nor --synthetic
    assert main(["prepare-eval", "--synthetic", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "is not a folder" in capsys.readouterr().err
