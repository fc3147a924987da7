"""`realsr-r1 infer` and `realsr-r1 eval` end to end with the tiny policy and built-in images."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from app.cli import main
from vlcot.fidelity import psnr_y
from rollout.engine import Sample
from vlcot.config import ImageConfig
from vlcot.policy import build_tiny_policy
from vlcot.trace import Trace, serialise_response

pytestmark = pytest.mark.slow
# The tile counts below are for 32-px LR tiles (a 50x37 image is 2x2 tiles, 20x30 is below one),
# so this module's policy and commands use that geometry, whatever the default demo's sizes are
IMAGE = ImageConfig(hr_size=128, lr_size=32, prompt_size=128, patch_px=32)
GEOMETRY = [f"image.{k}={v}" for k, v in dataclasses.asdict(IMAGE).items()]
FAST = ["rollout.sampling.text_budget=48", *GEOMETRY]  # the random policy babbles: keep its text short


@pytest.fixture(scope="module")
def run_dir(tiny_cfg, tiny_vq, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    build_tiny_policy(tiny_cfg.policy, IMAGE, tiny_cfg.vq).save(d / "policy")
    tiny_vq.save(d / "vq")
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    astro = Image.fromarray(skimage.data.astronaut())
    astro.resize((50, 37)).save(d / "odd.png")
    Image.fromarray(skimage.data.camera()).resize((20, 30)).save(d / "grey_small.png")  # mode L, below one tile
    astro.convert("RGBA").resize((40, 33)).save(d / "alpha.png")
    Image.fromarray((np.asarray(Image.fromarray(skimage.data.camera()).resize((33, 33)), np.uint16) * 257)).save(d / "deep16.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


def test_infer_folder_of_odd_sizes_and_modes(run_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["infer", "--checkpoint", str(run_dir / "policy"), "--image", str(inputs), "--out", str(out),
               "--no-progress", *FAST])
    assert rc == 0
    for name, (w, h) in {"odd": (50, 37), "grey_small": (20, 30), "alpha": (40, 33), "deep16": (33, 33)}.items():
        assert Image.open(out / "final" / f"{name}.png").size == (4 * w, 4 * h)
        assert Image.open(out / "middle" / f"{name}.png").size == (2 * w, 2 * h)
        assert Image.open(out / "rough" / f"{name}.png").size == (w, h)
        rec = json.loads((out / "cot" / f"{name}.json").read_text())
        assert rec["input_size"] == [w, h] and rec["output_size"] == [4 * w, 4 * h]
        assert len(rec["tiles"]) == (4 if name in ("odd", "alpha", "deep16") else 1)
        assert all("finish_reason" in t and "strict_format" in t for t in rec["tiles"])
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["input"].rsplit("/", 1)[1] for s in skipped} == {"broken.jpg", "notes.txt"}
    summary = json.loads((out / "infer_summary.json").read_text())
    assert summary["written"] == 4 and summary["skipped"] == 2
    assert "4 images written" in capsys.readouterr().out
    # an image's output depends on its name and the seed, not on what else was in the folder
    # (so eval's shards over actors reproduce a one-process run)
    alone = tmp_path / "alone"
    assert main(["infer", "--checkpoint", str(run_dir / "policy"), "--image", str(inputs / "odd.png"), "--out",
                 str(alone), "--no-progress", *FAST]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(alone / "final" / "odd.png")),
                                  np.asarray(Image.open(out / "final" / "odd.png")))


def test_infer_resize_mode_and_tile_cap(run_dir, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(skimage.data.coffee()).resize((300, 200)).save(big)
    for mode, extra, tiles in (("resize", [], 1), ("tile", ["infer.max_tiles=2"], 2)):
        out = tmp_path / mode
        assert main(["infer", "--checkpoint", str(run_dir / "policy"), "--image", str(big), "--out", str(out),
                     "--no-progress", f"infer.mode={mode}", *extra, *FAST]) == 0
        rec = json.loads((out / "cot" / "big.json").read_text())
        assert len(rec["tiles"]) == tiles  # resize: one; tile: the cap's 2 (a 2x1 grid), not 12, not 0
        if mode == "resize":
            assert Image.open(out / "final" / "big.png").size == (1200, 800) and rec["prescale"] == 1.0
        else:  # 300x200 needs 12 tiles: downscaled first until 2 fit, and said so
            assert rec["prescale"] < 0.2 and rec["output_size"][0] == 4 * round(300 * rec["prescale"])


def test_infer_and_eval_argument_errors_are_clear(run_dir, tmp_path, capsys):
    assert main(["infer", "--checkpoint", str(tmp_path), "--image", str(tmp_path)]) == 2
    assert "not an HF policy folder" in capsys.readouterr().err
    policy = str(run_dir / "policy")
    assert main(["eval", "--checkpoint", policy, "--checkpoint", policy]) == 2
    assert "the name 'policy' is taken" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", policy, "--data", f"x={tmp_path / 'nope'}"]) == 2
    assert "no such image or folder" in capsys.readouterr().err


class _TraceEngine:
    """Stands in for the generation engine only: answers every tile with a well-formed trace
    whose images are the VQ codes of the tile itself, so every stage must decode (no fallback)."""

    def __init__(self, resolver):
        self.r = resolver

    def generate(self, prompts, n=1, seed=0, greedy=False):
        im = self.r.cfg.image
        out = []
        for i, _ in enumerate(prompts):
            tile = self.tiles[len(out)]
            codes = {k: self.r.vq.encode_images([tile], im.hr_size // s)[0] for k, s in (("rough", 4), ("middle", 2), ("final", 1))}
            t = Trace(["light", "downsample", "medium", "none", "upsample"], "A person.", "A person in a suit.",
                      "An astronaut.", codes["rough"], codes["middle"], codes["final"])
            ids = serialise_response(t, self.r.codec, self.r.layout)
            out.append([Sample(i, 0, ids, [0.0] * len(ids), "stop", 0)])
        return out


def test_well_formed_traces_are_decoded_and_blended_without_fallback(tiny_cfg, run_dir):
    from evaluation.infer import SuperResolver

    r = SuperResolver(dataclasses.replace(tiny_cfg, image=IMAGE), run_dir / "policy", run_dir / "vq")
    fake = _TraceEngine(r)
    original = r._generate

    def generate(tiles, seed):
        fake.tiles = tiles
        r.engine = fake
        return original(tiles, seed)

    r._generate = generate
    img = Image.fromarray(skimage.data.astronaut()).resize((50, 37))
    images, rec = r.super_resolve(img)
    assert rec["fallback_tiles"] == {"rough_image": 0, "middle_image": 0, "final_image": 0}
    assert rec["strict_format_rate"] == 1.0 and rec["degradation"] == ["light", "downsample", "medium", "none", "upsample"]
    assert images["final_image"].shape == (148, 200, 3) and images["rough_image"].shape == (37, 50, 3)
    assert rec["tiles"][0]["texts"]["rough_understand"] == "A person."


def _eval_data(root):
    lr, hr, un = root / "lr", root / "hr", root / "unpaired"
    for d in (lr, hr, un):
        d.mkdir()
    for name, arr in (("chelsea", skimage.data.chelsea()), ("coffee", skimage.data.coffee()), ("rocket", skimage.data.rocket())):
        h = Image.fromarray(arr).resize((128, 96))
        h.save(hr / f"{name}.png")
        h.resize((32, 24), Image.BICUBIC).save(lr / f"{name}.png")
        h.resize((40, 30), Image.BICUBIC).save(un / f"{name}.jpg")
    Image.fromarray(skimage.data.camera()).resize((32, 32)).save(lr / "orphan.png")  # no HR: skipped, noted
    (lr / "chelsea.json").write_text(json.dumps({"labels": ["light", "downsample", "light", "none", "upsample"],
                                                 "tags": ["cat"]}))
    return lr, hr, un


def test_eval_paired_and_unpaired_table_grids_and_mlflow(run_dir, tmp_path, capsys):
    from evaluation.image_metrics import FID_WEIGHTS
    from tests.evaluation.fid_weights import write_in_iqa_env

    lr, hr, un = _eval_data(tmp_path)
    out = tmp_path / "eval"
    weights = write_in_iqa_env(tmp_path / "weights" / FID_WEIGHTS).parent  # FID's file only: the rest are n/a
    rc = main(["eval", "--checkpoint", f"tiny={run_dir / 'policy'}", "--data", f"paired={lr},{hr}",
               "--data", f"unpaired={un}", "--out", str(out), "--no-progress", f"run_dir={tmp_path / 'r'}",
               "eval.grid_images=2", f"eval.weights_dir={weights}", *FAST])
    assert rc == 0
    rows = {(r["dataset"], r["metric"]): r for r in csv.DictReader((out / "table.csv").open())}
    for col in ("tiny", "Bicubic"):
        assert float(rows[("paired", "PSNR↑")][col]) > 5 and 0 < float(rows[("paired", "SSIM↑")][col]) <= 1
        assert float(rows[("unpaired", "NIQE*↓")][col]) > 0
        assert rows[("paired", "LPIPS↓")][col] == "unavailable" and rows[("unpaired", "MUSIQ [musiq: KonIQ]↑")][col] == "unavailable"
        assert rows[("unpaired", "PSNR↑")][col] == ""  # no reference: not applicable
        assert float(rows[("paired", "FID [fid: clean]↓")][col]) > 0  # one value per set and column
        assert rows[("unpaired", "FID [fid: clean]↓")][col] == ""  # no HR set to compare with
    assert 0 <= float(rows[("paired", "Format rate↑")]["tiny"]) <= 1 and rows[("paired", "Format rate↑")]["Bicubic"] == ""
    assert 0 <= float(rows[("paired", "Fallback tiles↓")]["tiny"]) <= 1
    assert rows[("paired", "Degradation acc.↑")]["tiny"] != ""  # chelsea has labels in its sidecar
    assert rows[("unpaired", "Tag recall↑")]["tiny"] == ""  # no tags there
    # the bicubic column is bicubic x4 of each LR, scored against its HR
    want = np.mean([psnr_y(np.asarray(Image.open(lr / f"{n}.png").resize((128, 96), Image.BICUBIC)),
                           np.asarray(Image.open(hr / f"{n}.png"))) for n in ("chelsea", "coffee", "rocket")])
    assert float(rows[("paired", "PSNR↑")]["Bicubic"]) == pytest.approx(want, abs=1e-9)
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(per_image) == (3 + 3) * 2
    assert len(list((out / "grids").glob("*.png"))) == 2 * 2
    md = (out / "table.md").read_text()
    assert "### paired (paired, 3 images)" in md and "orphan.png" in md and "missing" in md and "lpips.pth" in md
    assert "chelsea.json" not in md  # a sidecar, not a skipped input
    summary = json.loads((out / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/paired/Bicubic/psnr"] == pytest.approx(float(rows[("paired", "PSNR↑")]["Bicubic"]))
    assert "| Metric | tiny | Bicubic |" in capsys.readouterr().out


def test_infer_with_the_vllm_engine_in_its_own_process(run_dir, tmp_path):
    """vLLM patches the HF model classes of its process, so this runs the CLI as a subprocess."""
    import subprocess
    import sys

    img = tmp_path / "one.png"
    Image.fromarray(skimage.data.astronaut()).resize((40, 30)).save(img)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "infer", "--checkpoint", str(run_dir / "policy"),
                           "--image", str(img), "--out", str(out), "--no-progress", "infer.engine=vllm", *FAST], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(vllm engine, tile mode)" in proc.stdout
    assert Image.open(out / "final" / "one.png").size == (160, 120)
    rec = json.loads((out / "cot" / "one.json").read_text())
    assert len(rec["tiles"]) == 2 and all(t["tokens"] > 0 for t in rec["tiles"])  # 40 px: two tiles; 30: one


def test_constrained_infer_leaves_no_tile_to_bicubic(run_dir, inputs, tmp_path):
    """The random policy's free traces are malformed (tiles fall back to bicubic); with
    infer.constrained every tile's trace has the seven tags and all three images."""
    fallbacks = {}
    for constrained in (False, True):
        out = tmp_path / f"constrained_{constrained}"
        assert main(["infer", "--checkpoint", str(run_dir / "policy"), "--image", str(inputs / "odd.png"), "--out",
                     str(out), "--no-progress", "infer.mode=resize", "infer.seed=1",
                     f"infer.constrained={str(constrained).lower()}", *FAST]) == 0
        rec = json.loads((out / "cot" / "odd.json").read_text())
        fallbacks[constrained] = sum(rec["fallback_tiles"].values())
        if constrained:
            assert all(t["strict_format"] and t["finish_reason"] == "stop" for t in rec["tiles"])
    assert fallbacks[False] > 0 and fallbacks[True] == 0
