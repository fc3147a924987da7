"""Pure pieces of inference and evaluation: tiling, fidelity metrics, CoT grading, the table."""

import math

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter

from evaluation.workers import shards
from evaluation.cot import grade
from vlcot.fidelity import psnr_y, ssim_y
from evaluation.table import UNAVAILABLE, Block, Row, markdown, to_csv
from evaluation.tiling import TilePlan, axis_starts, blend


@pytest.mark.parametrize("length,tile,overlap", [(32, 32, 8), (50, 32, 8), (100, 32, 0), (33, 32, 31), (10, 32, 8)])
def test_tiles_cover_every_pixel_with_the_overlap(length, tile, overlap):
    starts = axis_starts(max(length, tile), tile, overlap)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all() and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blending_an_exact_model_reproduces_the_upscaled_image():
    """Each tile 'super-resolved' by nearest x4: the blended mosaic must equal nearest x4 of
    the whole image, cropped back from the padding (seams or offsets would show)."""
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    plan = TilePlan(50, 37, 32, 8)
    padded = plan.pad(lr)
    outs = [np.kron(padded[y0:y1, x0:x1], np.ones((4, 4, 1), np.uint8)) for x0, y0, x1, y1 in plan.boxes()]
    assert len(outs) == 4
    got = blend(plan, outs, 4)
    assert got.shape == (148, 200, 3)
    np.testing.assert_array_equal(got, np.kron(lr, np.ones((4, 4, 1), np.uint8)))
    small = TilePlan(20, 30, 32, 8)  # smaller than one tile: padded, then cropped
    tile = small.pad(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    assert blend(small, [tile], 1).shape == (30, 20, 3)
    with pytest.raises(ValueError, match="expected"):
        blend(plan, [o[:-1] for o in outs], 4)


def test_shards_are_contiguous_and_complete():
    assert shards(5, 2) == [[0, 1, 2], [3, 4]]
    assert shards(1, 3) == [[0]]
    assert sum(shards(11, 4), []) == list(range(11))


def test_psnr_ssim_identical_images_are_inf_and_one():
    img = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((96, 64)))
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2)))
    assert 15 < psnr_y(blurred, img) < 40 and 0.2 < ssim_y(blurred, img) < 0.99
    assert psnr_y(blurred, img, crop_border=4) != psnr_y(blurred, img)
    with pytest.raises(ValueError, match="shape"):
        psnr_y(img[:-1], img)


def test_cot_grading_per_tile_and_union_of_tags():
    labels = ["medium", "downsample", "heavy", "light", "upsample"]
    rec = {"tiles": [
        {"strict_format": True, "degradation": labels[:3] + ["none", "keep"], "invalid": {},
         "texts": {"rough_understand": "A cat on a sofa."}},
        {"strict_format": False, "degradation": labels, "invalid": {"degradation": "<degradation> is not closed"},
         "texts": {"rough_understand": "Two red chairs."}},
    ]}
    g = grade(rec, labels, ["cat", "chair", "dog"])
    assert g["strict_format"] == 0.5 and g["fallback_rate"] == 0.0
    assert g["degradation_accuracy"] == pytest.approx((3 / 5 + 0) / 2)  # an invalid stage scores 0
    assert g["tag_recall"] == pytest.approx(2 / 3)  # cat in one tile, chairs (plural) in the other
    assert grade(rec, None, None)["degradation_accuracy"] is None


def test_table_marks_best_unavailable_and_not_applicable():
    rows = [Row("psnr", "PSNR↑", 2), Row("lpips", "LPIPS↓"), Row("tag_recall", "Tag recall↑", 3)]
    b = Block("set", True, 3, rows, ["ours", "Bicubic"])
    b.cells.update({("psnr", "ours"): 24.5, ("psnr", "Bicubic"): 22.0, ("lpips", "ours"): UNAVAILABLE,
                    ("lpips", "Bicubic"): UNAVAILABLE, ("tag_recall", "ours"): 0.5, ("tag_recall", "Bicubic"): "–"})
    md = markdown([b], {"psnr": True, "lpips": False, "tag_recall": True}, ["LPIPS: unavailable, missing x"])
    assert "| PSNR↑ | **24.50** | 22.00 |" in md
    assert "| LPIPS↓ | n/a | n/a |" in md and "| Tag recall↑ | 0.500 | – |" in md and "- LPIPS: unavailable" in md
    lines = to_csv([b]).splitlines()
    assert lines[0] == "dataset,metric,ours,Bicubic"
    assert lines[2] == "set,LPIPS↓,unavailable,unavailable" and lines[3] == "set,Tag recall↑,0.5,"
