"""Eval metrics in the IQA environment (pyiqa), through the same Ray worker eval uses."""

import numpy as np
import pytest
import ray
import skimage.data
from PIL import Image, ImageFilter

from cluster.config import EnvConfig
from cluster.interpreters import runtime_env_for_iqa
from evaluation.workers import MetricWorker
from vlcot.fidelity import psnr_y, ssim_y

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    hr = Image.fromarray(skimage.data.chelsea()).resize((200, 136))
    noisy = np.asarray(hr.filter(ImageFilter.GaussianBlur(1.5))).astype(np.float64)
    noisy = np.clip(noisy + np.random.default_rng(0).normal(0, 8, noisy.shape), 0, 255).round().astype(np.uint8)
    hr.save(d / "hr.png")
    Image.fromarray(noisy).save(d / "sr.png")
    return str(d / "sr.png"), str(d / "hr.png")


def _pyiqa_direct(sr_path, hr_path):
    import pyiqa
    import torch
    from PIL import Image

    def t(p):
        return torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    x, y = t(sr_path), t(hr_path)
    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    ssim = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    return float(psnr(x, y)), float(ssim(x, y))


def test_psnr_ssim_match_pyiqa_called_directly(ray_local, pair):
    direct = ray.remote(_pyiqa_direct).options(runtime_env=runtime_env_for_iqa(EnvConfig()))
    want_psnr, want_ssim = ray.get(direct.remote(*pair))
    sr, hr = (np.asarray(Image.open(p).convert("RGB")) for p in pair)
    assert 18 < want_psnr < 35
    assert psnr_y(sr, hr) == pytest.approx(want_psnr, abs=1e-4)
    assert ssim_y(sr, hr) == pytest.approx(want_ssim, abs=1e-6)


def test_offline_metrics_filled_learned_ones_unavailable_not_crashing(ray_local, pair, tmp_path):
    (tmp_path / "musiq.pth").write_bytes(b"not a checkpoint")  # present but unusable
    names = ["psnr", "ssim", "niqe", "lpips", "musiq", "topiq_nr", "maniqa_pipal", "topiq_nr_spaq", "fid"]
    w = MetricWorker.options(runtime_env=runtime_env_for_iqa(EnvConfig())).remote(names, str(tmp_path), 0)
    shard = ray.get(w.score.remote([pair, (pair[0], None), (str(tmp_path / "missing.png"), pair[1])]))
    ray.kill(w)
    st = shard.status
    assert st["psnr"].available and st["ssim"].available and st["niqe"].available
    assert st["niqe"].label == "NIQE*"  # no MATLAB pristine model in weights_dir: the built-in one, labelled
    assert not st["lpips"].available and "lpips.pth" in st["lpips"].reason
    assert not st["musiq"].available and "could not be built offline" in st["musiq"].reason
    assert not st["topiq_nr"].available and "topiq_nr.pth" in st["topiq_nr"].reason
    # the paper's variants: their own weight files, their own labels, n/a without them
    assert not st["maniqa_pipal"].available and "maniqa_pipal.pth" in st["maniqa_pipal"].reason
    assert not st["topiq_nr_spaq"].available and "topiq_nr_spaq.pth" in st["topiq_nr_spaq"].reason
    assert (st["maniqa_pipal"].label, st["topiq_nr_spaq"].label) == ("MANIQA [maniqa-pipal]", "TOPIQ [topiq_nr-spaq]")
    assert st["topiq_nr"].label == "TOPIQ [topiq_nr: KonIQ]"
    assert not st["fid"].available and "pt_inception-2015-12-05-6726825d.pth" in st["fid"].reason
    full, unpaired, unreadable = shard.values
    assert 18 < full["psnr"] < 35 and 0 < full["ssim"] < 1 and 2 < full["niqe"] < 30
    assert full["lpips"] is None and full["musiq"] is None
    assert unpaired["psnr"] is None and unpaired["niqe"] == pytest.approx(full["niqe"])
    assert all(v is None for v in unreadable.values()) and len(shard.unreadable) == 1


def test_fid_is_a_set_level_metric_from_local_inception_weights(ray_local, tmp_path):
    from evaluation.image_metrics import FID_WEIGHTS
    from tests.evaluation.fid_weights import write_in_iqa_env

    rng = np.random.default_rng(0)
    base = Image.fromarray(skimage.data.astronaut()).resize((96, 96))
    hr, same, far = tmp_path / "hr", tmp_path / "same", tmp_path / "far"
    for d in (hr, same, far):
        d.mkdir()
    for i in range(4):
        img = base.rotate(90 * i)
        img.save(hr / f"{i}.png")
        img.save(same / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(far / f"{i}.png")
    files = lambda d: [str(p) for p in sorted(d.glob("*.png"))]  # noqa: E731
    env = runtime_env_for_iqa(EnvConfig())
    write_in_iqa_env(tmp_path / FID_WEIGHTS)
    w = MetricWorker.options(runtime_env=env).remote(["psnr", "fid"], str(tmp_path), 0)
    shard = ray.get(w.score.remote([(files(same)[0], files(hr)[0])]))
    assert shard.status["fid"].available and shard.values[0]["fid"] is None  # never a per-image value
    identical, different, too_few = ray.get(w.score_sets.remote(
        [(files(same), files(hr)), (files(far), files(hr)), (files(same)[:1], files(hr))]))
    ray.kill(w)
    assert abs(identical["fid"]) < 1e-3 < different["fid"]
    assert too_few["fid"] is None
