import json

import numpy as np
import pytest
from PIL import Image

from app.cli import main as cli_main
from vlcot.config import DataConfig, DegradationConfig, ImageConfig
from vlcot.data import center_box, folder_candidates, prepare, square_crop
from vlcot.images import open_image, to_rgb
from vlcot.manifest import Captions, read_manifest
from vlcot.trace import SLOT_WORDS, SLOTS

IMAGE = ImageConfig(hr_size=128, lr_size=32, prompt_size=128)


def photo(size=(160, 140)):
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((base * 0.7 + rng.integers(0, 70, base.shape)).astype(np.uint8))


def make_zoo(folder):
    """One file per kind of trouble, plus good images with and without annotations."""
    folder.mkdir()
    photo().save(folder / "good.png")
    (folder / "good.json").write_text(json.dumps({"captions": {"x4": "a", "x2": "b", "x1": "c"}, "tags": ["cat", "dog"]}))
    photo().save(folder / "good_badsidecar.jpg")
    (folder / "good_badsidecar.json").write_text("{not json")
    (folder / "empty.png").write_bytes(b"")
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 3])
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "notes.txt").write_text("a note someone left")
    photo().convert("CMYK").save(folder / "cmyk.jpg")
    arr16 = (np.linspace(0, 65535, 150 * 150).reshape(150, 150)).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    pal = photo().convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    rgba = photo().convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    photo().convert("L").save(folder / "grey.png")
    Image.new("RGB", (1, 1), "red").save(folder / "onebyone.png")
    Image.new("L", (1200, 1000), 7).save(folder / "huge.png")


def test_bad_file_zoo(tmp_path):
    make_zoo(tmp_path / "in")
    data = DataConfig(output_dir=str(tmp_path / "out"), min_side=128, max_pixels=1_000_000)
    summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)

    skipped = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {"empty", "truncated", "text", "notes", "onebyone", "huge"}
    assert "empty file" in skipped["empty"]
    assert "truncated" in skipped["truncated"]
    assert "not an image" in skipped["text"]
    assert "not an image file type (.txt)" in skipped["notes"]
    assert "too small: 1x1" in skipped["onebyone"]
    assert "too large" in skipped["huge"]

    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    ids = {r.id for r in rows}
    assert ids == {f"{n}_v0" for n in ("good", "good_badsidecar", "cmyk", "sixteen", "palette", "alpha", "grey")}
    assert summary.seen == 13 and summary.images_ok == 7 and summary.samples == 7
    assert sum(summary.skipped.values()) == 6  # nothing disappears: seen = ok + skipped
    assert summary.converted["converted from CMYK"] == 1
    assert summary.converted["converted from L"] == 1
    assert any(k.startswith("converted from I") for k in summary.converted)
    assert summary.annotation_problems["bad sidecar good_badsidecar.json"] == 1

    by_id = {r.id: r for r in rows}
    assert by_id["good_v0"].captions == Captions(x4="a", x2="b", x1="c")
    assert by_id["good_v0"].tags == ["cat", "dog"]
    assert by_id["grey_v0"].captions is None
    for r in rows:
        lr = Image.open(r.lr_path)
        hr = Image.open(r.hr_path)
        assert lr.size == (32, 32) and lr.mode == "RGB"
        assert hr.size == (128, 128) and hr.mode == "RGB"
        labels = r.degradation.labels
        assert all(w in SLOT_WORDS[s] for s, w in zip(SLOTS, labels))
    # the 50 %-transparent image was composited on white, so it is brighter than the source
    alpha_hr = np.asarray(Image.open(by_id["alpha_v0"].hr_path), dtype=float).mean()
    good_hr = np.asarray(Image.open(by_id["good_v0"].hr_path), dtype=float).mean()
    assert alpha_hr > good_hr + 20


def test_to_rgb_modes():
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)


def test_open_image_missing_file(tmp_path):
    img, why, _ = open_image(tmp_path / "missing.png")
    assert img is None and "unreadable" in why


def test_variants_have_distinct_seeds(tmp_path):
    (tmp_path / "in").mkdir()
    photo().save(tmp_path / "in" / "a.png")
    data = DataConfig(output_dir=str(tmp_path / "out"), variants_per_image=3)
    prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert len(rows) == 3 and len({r.seed for r in rows}) == 3
    assert len({r.hr_path for r in rows}) == 1


def test_random_crops_and_a_heldout_set_that_never_overlaps_the_training_prompts(tmp_path):
    """Each crop is its own HR with its own degradations; the held-out crops are boxes and
    degradation draws no manifest record has, written beside the manifest, never into it."""
    (tmp_path / "in").mkdir()
    photo((260, 200)).save(tmp_path / "in" / "a.png")
    photo((200, 240)).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "in" / "b.png")
    data = DataConfig(output_dir=str(tmp_path / "out"), crops_per_image=4, heldout_per_image=3, variants_per_image=2)
    summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)
    train = read_manifest(tmp_path / "out" / "manifest.jsonl")
    held = read_manifest(tmp_path / "out" / "heldout.jsonl")
    assert (len(train), len(held)) == (2 * 4 * 2, 2 * 3) == (summary.samples, summary.heldout_samples)
    assert summary.heldout_manifest == str(tmp_path / "out" / "heldout.jsonl")
    assert sum(summary.labels[0].values()) == len(train)  # label counts describe the training prompts only
    views = lambda rows: {(r.source, tuple(r.crop)) for r in rows}
    assert len(views(train)) == 8 and len(views(held)) == 6 and not views(train) & views(held)  # one LR per held-out crop
    assert not {r.seed for r in train} & {r.seed for r in held}
    assert not {r.hr_path for r in train} & {r.hr_path for r in held}
    train_lr = {np.asarray(Image.open(r.lr_path)).tobytes() for r in train}
    assert not train_lr & {np.asarray(Image.open(r.lr_path)).tobytes() for r in held}
    for r in train + held:  # every box is a square inside its image, at least the HR size
        left, top, side = r.crop
        w, h = Image.open(r.source).size
        assert side >= 128 and 0 <= left <= w - side and 0 <= top <= h - side, r.crop
    r = held[0]  # the HR is exactly that box of the source, resized
    hr = square_crop(Image.open(r.source).convert("RGB"), tuple(r.crop), 128)
    assert np.array_equal(np.asarray(hr), np.asarray(Image.open(r.hr_path)))
    before = (tmp_path / "out" / "heldout.jsonl").read_text()  # seeded: a rerun makes the same sets
    prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)
    assert (tmp_path / "out" / "heldout.jsonl").read_text() == before


def test_default_is_the_centre_square_and_no_heldout_set(tmp_path):
    (tmp_path / "in").mkdir()
    photo((160, 140)).save(tmp_path / "in" / "a.png")
    data = DataConfig(output_dir=str(tmp_path / "out"))
    summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)
    (row,) = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert row.id == "a_v0" and tuple(row.crop) == center_box(160, 140) == (10, 0, 140)
    assert summary.heldout_samples == 0 and not (tmp_path / "out" / "heldout.jsonl").exists()
    # a 128-px square has one 128-px box, which training takes: its held-out crop is counted as not made
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "in" / "small.png")
    summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(),
                      DataConfig(output_dir=str(tmp_path / "out"), heldout_per_image=1), progress=False)
    assert (summary.samples, summary.heldout_samples, summary.heldout_missing) == (2, 1, 1)
    assert "1 crops not made" in summary.render()
    assert [r.id for r in read_manifest(tmp_path / "out" / "heldout.jsonl")] == ["a_h0_v0"]


def test_cli_prepare_data_builtin(tmp_path, capsys, tiny_cfg):
    assert cli_main(["prepare-data", "--no-progress", "--out", str(tmp_path / "builtin")]) == 0
    out = capsys.readouterr().out
    rows = read_manifest(tmp_path / "builtin" / "manifest.jsonl")
    assert len(rows) == 11 * tiny_cfg.data.variants_per_image and "11 usable" in out
    names = {r.id for r in rows}
    assert {"astronaut_v0", "chelsea_v0", "retina_v0"} <= names
    astro = next(r for r in rows if r.id == "astronaut_v0")
    assert "spacesuit" in astro.tags and astro.captions.x4
    assert Image.open(astro.lr_path).size == (tiny_cfg.image.lr_size,) * 2  # the default config's sizes
    assert "WARNING" not in out  # every built-in image is annotated


def test_cli_prepare_data_folder_and_bad_config(tmp_path, capsys):
    make_zoo(tmp_path / "in")
    code = cli_main(["prepare-data", "--no-progress", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                     "data.max_pixels=1000000"])
    assert code == 0
    assert "skipped: 6" in capsys.readouterr().out
    assert cli_main(["prepare-data", "data.min_sid=3"]) == 2
    assert "data.min_sid" in capsys.readouterr().err


def unannotated_folder(folder):
    """Four photographs: annotated, captions without tags, and two with nothing (no sidecar)."""
    folder.mkdir()
    for name in ("full", "notags", "bare1", "bare2"):
        photo().save(folder / f"{name}.png")
    caps = {"x4": "a", "x2": "b", "x1": "c"}
    (folder / "full.json").write_text(json.dumps({"captions": caps, "tags": ["cat"]}))
    (folder / "notags.json").write_text(json.dumps({"captions": caps, "tags": []}))


def test_missing_captions_and_tags_are_counted_and_warned(tmp_path, caplog):
    unannotated_folder(tmp_path / "in")
    data = DataConfig(output_dir=str(tmp_path / "out"))
    with caplog.at_level("WARNING", logger="vlcot.data"):
        summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data,
                          progress=False)
    assert (summary.missing_captions, summary.missing_tags, summary.samples) == (2, 3, 4)
    text = summary.render()
    assert "WARNING: 2 of 4 images have no captions" in text and "WARNING: 3 of 4 images have no tags" in text
    assert "data.require_annotations" in text
    assert sum("no captions" in r.getMessage() for r in caplog.records) == 1
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (saved["missing_captions"], saved["missing_tags"]) == (2, 3)


def test_require_annotations_stops_before_any_work_naming_the_images(tmp_path):
    unannotated_folder(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"")  # a bad image without a sidecar is named too
    data = DataConfig(output_dir=str(tmp_path / "out"), require_annotations=True)
    with pytest.raises(ValueError, match=r"data\.require_annotations .* 4 of 5 images") as err:
        prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data, progress=False)
    msg = str(err.value)
    assert "notags.png: no tags" in msg and "bare1.png: no captions and no tags" in msg and "full.png" not in msg
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    (tmp_path / "in" / "notags.json").write_text(json.dumps({"captions": {"x4": "a", "x2": "b", "x1": "c"},
                                                              "tags": ["dog"]}))
    for name in ("bare1", "bare2", "broken"):
        (tmp_path / "in" / f"{name}.json").write_text(json.dumps({"captions": {"x4": "a", "x2": "b", "x1": "c"},
                                                                   "tags": ["dog"]}))
    summary = prepare(folder_candidates(tmp_path / "in"), tmp_path / "out", IMAGE, DegradationConfig(), data,
                      progress=False)
    assert summary.samples == 4 and summary.missing_captions == summary.missing_tags == 0


def test_usm_hr_sharpens_the_target_but_degrades_from_the_plain_hr(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo().save(folder / "p.png")
    plain = prepare(folder_candidates(folder), tmp_path / "a", IMAGE, DegradationConfig(),
                    DataConfig(output_dir=str(tmp_path / "a")), progress=False)
    usm = prepare(folder_candidates(folder), tmp_path / "b", IMAGE, DegradationConfig(),
                  DataConfig(output_dir=str(tmp_path / "b"), usm_hr=True), progress=False)
    assert plain.samples == usm.samples == 1
    a, b = read_manifest(tmp_path / "a" / "manifest.jsonl")[0], read_manifest(tmp_path / "b" / "manifest.jsonl")[0]
    assert (a.hr_usm, b.hr_usm) == (False, True)
    assert np.array_equal(np.asarray(Image.open(a.lr_path)), np.asarray(Image.open(b.lr_path)))
    assert not np.array_equal(np.asarray(Image.open(a.hr_path)), np.asarray(Image.open(b.hr_path)))
