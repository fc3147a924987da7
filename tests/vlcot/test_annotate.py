"""`realsr-r1 annotate` end to end with tiny random models built here from transformers
configs (a BLIP captioner and an OWLv2 detector, each saved with its processor and a tiny
tokenizer), on built-in photographs; then prepare-data reads the sidecars."""

import json

import pytest

from app.cli import main
from vlcot.annotate import caption_nouns
from vlcot.data import builtin_candidates
from vlcot.manifest import read_manifest
from vlcot.tiny_annotators import WORDS, build_captioner, build_detector

VOCABULARY = ["cat", "dog", "tree"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    build_captioner(root / "blip")
    build_detector(root / "owl")
    return root


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for cand in list(builtin_candidates())[:5]:
        cand.image.convert("RGB").save(folder / f"{cand.id}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def annotate(folder, models, *extra):
    return main(["annotate", "--input", str(folder), "--no-progress", f"annotate.captioner={models / 'blip'}",
                 "annotate.min_new_tokens=3", "annotate.max_new_tokens=8", "annotate.batch_size=2",
                 "annotate.prompts={x4: 'a photo of', x2: 'a photo of', x1: 'a photo of'}", *extra])


def test_annotate_writes_sidecars_that_prepare_data_reads(models, photos, tmp_path, capsys, tiny_cfg):
    rc = annotate(photos, models, f"annotate.detector={models / 'owl'}", "annotate.score_threshold=0.0",
                  f"annotate.vocabulary={VOCABULARY}")
    out = capsys.readouterr().out
    assert rc == 1  # the broken file fails (listed); every other image is annotated
    assert "5 sidecars written" in out and "broken.png" in out and "detector 5" in out
    assert not (photos / "broken.json").exists()
    for f in sorted(photos.glob("*.json")):
        side = json.loads(f.read_text())
        assert sorted(side["captions"]) == ["x1", "x2", "x4"]
        assert all(c and set(c.split()) <= set(WORDS) for c in side["captions"].values()), side  # the model's words
        assert side["tags"] and set(side["tags"]) <= set(VOCABULARY)
    assert main(["prepare-data", "--no-progress", "--input", str(photos), "--out", str(tmp_path / "data")]) == 0
    rows = read_manifest(tmp_path / "data" / "manifest.jsonl")
    assert len(rows) == 5 * tiny_cfg.data.variants_per_image and all(r.captions.x4 and r.tags for r in rows)
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert (summary["missing_captions"], summary["missing_tags"]) == (0, 0)


def test_an_interrupted_run_resumes_and_overwrite_redoes(models, photos, capsys):
    assert annotate(photos, models) == 1  # tags from the captions' nouns without a detector
    assert "caption nouns 5" in capsys.readouterr().out
    sidecars = sorted(photos.glob("*.json"))
    sidecars[0].unlink()  # as if the run had been killed before these two
    sidecars[1].unlink()
    (photos / "half.json.tmp").write_text("{")  # a sidecar cut off mid-write
    kept = sidecars[2].read_text()
    sidecars[2].write_text(kept.replace('"tags"', '"tags_hand_checked": true, "tags"'))
    assert annotate(photos, models) == 1
    out = capsys.readouterr().out
    assert "2 sidecars written, 3 kept" in out
    assert sidecars[0].is_file() and sidecars[1].is_file() and not (photos / "half.json.tmp").exists()
    assert "tags_hand_checked" in sidecars[2].read_text()  # existing sidecars are not touched
    assert annotate(photos, models, "--overwrite") == 1
    assert "5 sidecars written, 0 kept" in capsys.readouterr().out
    assert "tags_hand_checked" not in sidecars[2].read_text()


def test_a_missing_or_wrong_model_folder_is_one_error_naming_it(models, photos, tmp_path, capsys):
    assert annotate(photos, models, f"annotate.captioner={tmp_path / 'nowhere'}") == 2
    err = capsys.readouterr().err
    assert "annotate.captioner" in err and "nowhere" in err and "no config.json" in err
    assert annotate(photos, models, f"annotate.captioner={models / 'owl'}") == 2  # a detector is no captioner
    assert "'owlv2' model does not turn images into text" in capsys.readouterr().err
    assert annotate(photos, models, f"annotate.detector={models / 'blip'}") == 2
    assert "annotate.detector" in capsys.readouterr().err
    assert not list(photos.glob("*.json"))  # nothing written before the models load


def test_caption_nouns_drop_stop_words():
    assert caption_nouns("A close photo of a red cat sitting on the old wooden table near windows.", 4) == \
        ["red", "cat", "wooden", "table"]
