"""The manifest record: written then read back equal, on-disk format unchanged, and a bad row
refused in one line that names the file, the row and the field."""

import json

import pytest

from vlcot.errors import UserError
from vlcot.manifest import Captions, DegradationRecord, ManifestRecord, read_manifest, write_manifest

ROW = {"id": "a_c0_v1", "source": "/photos/a.png", "hr_path": "hr/a_c0.png", "lr_path": "lr/a_c0_v1.png",
       "hr_size": 128, "hr_usm": True, "lr_size": 32, "seed": 12345, "crop": [10, 0, 140],
       "captions": {"x4": "a cat", "x2": "a grey cat", "x1": "a grey cat on a mat"}, "tags": ["cat", "mat"],
       "degradation": {"labels": ["light", "downsample", "heavy", "none", "upsample"],
                       "text": "light blur, downsample, heavy noise, no compression, upsample",
                       "params": {"blur_sigma": 0.8, "kernel": "iso", "jpeg_q": [95, 90]}},
       "notes": ["converted from L"]}


def record(folder):
    return ManifestRecord(
        id="a_c0_v1", source="/photos/a.png", hr_path=str(folder / "hr" / "a_c0.png"),
        lr_path=str(folder / "lr" / "a_c0_v1.png"), hr_size=128, lr_size=32, seed=12345,
        degradation=DegradationRecord(["light", "downsample", "heavy", "none", "upsample"],
                                      "light blur, downsample, heavy noise, no compression, upsample",
                                      {"blur_sigma": 0.8, "kernel": "iso", "jpeg_q": [95, 90]}),
        captions=Captions("a cat", "a grey cat", "a grey cat on a mat"), tags=["cat", "mat"],
        notes=["converted from L"], hr_usm=True, crop=(10, 0, 140))


def test_a_written_record_reads_back_equal_in_the_same_on_disk_format(tmp_path):
    folder = tmp_path.resolve()
    written = [record(folder), ManifestRecord(**{**vars(record(folder)), "id": "b_v0", "captions": None, "tags": []})]
    write_manifest(folder / "manifest.jsonl", written)
    assert read_manifest(folder / "manifest.jsonl") == written
    first = (folder / "manifest.jsonl").read_text().splitlines()[0]
    assert first == json.dumps(ROW)  # keys, order and relative paths exactly as prepare-data has always written


def test_a_manifest_from_before_crops_and_usm_still_loads(tmp_path):
    old = {k: v for k, v in ROW.items() if k not in ("crop", "hr_usm")}
    (tmp_path / "m.jsonl").write_text(json.dumps(old) + "\n")
    (rec,) = read_manifest(tmp_path / "m.jsonl")
    assert (rec.crop, rec.hr_usm, rec.degradation.labels[2]) == (None, False, "heavy")
    assert rec.lr_path == str((tmp_path / "lr" / "a_c0_v1.png").resolve())


def without(key):
    row = json.loads(json.dumps(ROW))
    *outer, last = key.split(".")
    d = row
    for k in outer:
        d = d[k]
    del d[last]
    return row


def changed(key, value):
    row = json.loads(json.dumps(ROW))
    *outer, last = key.split(".")
    d = row
    for k in outer:
        d = d[k]
    d[last] = value
    return row


@pytest.mark.parametrize("row, field, problem", [
    (without("lr_path"), "'lr_path'", "is missing"),
    (without("degradation.labels"), "'degradation.labels'", "is missing"),
    (without("captions.x2"), "'captions.x2'", "is missing"),
    (changed("seed", "12345"), "'seed'", "is a JSON string, not integer"),
    (changed("hr_size", True), "'hr_size'", "is a JSON true/false, not integer"),
    (changed("tags", "cat"), "'tags'", "is a JSON string, not list"),
    (changed("tags", ["cat", 3]), "'tags[1]'", "is a JSON number, not a string"),
    (changed("captions", ["a", "b", "c"]), "'captions'", "is a JSON list, not object or null"),
    (changed("degradation.labels", ["light", "downsample"]), "'degradation.labels'", "has 2 words"),
    (changed("degradation.labels", ["light", "heavy", "heavy", "none", "upsample"]), "'degradation.labels[1]'",
     "'heavy' is not a resize word"),
    (changed("crop", [1, 2]), "'crop'", "not [left, top, side]"),
    (["not", "a", "record"], "", "a JSON list, not a record"),
])
def test_a_bad_row_is_refused_naming_the_file_the_row_and_the_field(tmp_path, row, field, problem):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n" + json.dumps(row) + "\n")  # a blank line still counts as a line
    with pytest.raises(UserError) as err:
        read_manifest(path, "data.rl_manifest")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"data.rl_manifest {path}:3: {field}".rstrip() + " " if field else
                              f"data.rl_manifest {path}:3: ")
    assert problem in message and "realsr-r1 prepare-data" in message


def test_read_manifest_names_the_bad_line(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_manifest(tmp_path / "m.jsonl")
