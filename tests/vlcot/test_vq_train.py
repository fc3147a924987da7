"""The demo's trained VQ tokenizer: the training script, the shipped weights, their errors."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vlcot.config import BUILTIN_VQ, VQCheckpointError, VQConfig, VQTrainConfig
from vlcot.vq import VQTokenizer, vq_from_config
from vlcot.vq_train import (TRAINING_FILE, CropSampler, reconstruction_psnr, reference_crop, spherical_kmeans,
                            train_vq, training_images)


def test_spherical_kmeans_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    points = F.normalize(centres.repeat_interleave(200, 0) + 0.03 * torch.randn(1200, 8, generator=g), dim=1)
    found = spherical_kmeans(points, 48, iters=10, gen=g)
    assert torch.allclose(found.norm(dim=1), torch.ones(48), atol=1e-5)
    # every true centre has a centroid on top of it, and no centroid sits between clusters
    cos = centres @ found.T
    assert cos.max(1).values.min() > 0.99
    assert cos.max(0).values.min() > 0.95


def test_spherical_kmeans_reseeds_empty_clusters():
    # 50 copies of one point and one outlier, 8 centroids: duplicates leave clusters empty at
    # every iteration. Each must come back a unit vector near a data point, never a zero or
    # NaN row (a zero sum normalised) that no latent could be matched to.
    data = torch.cat([torch.tensor([[1.0, 0, 0]]).repeat(50, 1), torch.tensor([[0, 1.0, 0]])])
    found = spherical_kmeans(data, 8, iters=3, gen=torch.Generator().manual_seed(0))
    assert torch.isfinite(found).all()
    assert torch.allclose(found.norm(dim=1), torch.ones(8), atol=1e-5)
    assert (found @ data.T).max(1).values.min() > 0.99


def test_crop_sampler_is_seeded_and_in_range():
    images = {k: v for k, v in training_images().items() if k in ("astronaut", "skimage.camera")}
    assert len(images) == 2
    cfg = VQTrainConfig(crop=32, scales=[1.0, 0.5])
    a, b = CropSampler(images, cfg).batch(6), CropSampler(images, cfg).batch(6)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, CropSampler(images, replace(cfg, seed=1)).batch(6))
    with pytest.raises(ValueError, match="at least 4096 px"):
        CropSampler(images, replace(cfg, crop=4096))


def test_training_images_exclude_the_held_out_photographs():
    names = set(training_images())
    assert {"astronaut", "chelsea", "coffee", "skimage.camera"} <= names
    # the bench's held-out photographs live in the IQA environment's packages, never read here
    assert not any(n.startswith(("I0", "I1", "SPAQ", "frame_")) for n in names)


def test_short_training_run_learns_and_records_how_it_was_made(tiny_cfg, tmp_path):
    images = {k: v for k, v in training_images().items() if k in ("astronaut", "coffee")}
    cfg = VQTrainConfig(autoencoder_steps=100, quantised_steps=30, batch_size=4, crop=32, kmeans_crops=16,
                        kmeans_iters=2, log_every=10, warmup_steps=5, seed=3)
    lines = []
    report = train_vq(tiny_cfg.vq, cfg, tmp_path / "vq", log=lines.append, images=images)
    hist = report.history
    assert [h["phase"] for h in hist] == [1] * 10 + [2] * 3
    assert hist[-1]["psnr_rgb"] > hist[0]["psnr_rgb"] + 1.0  # it learned something (seeded: 9.8 -> 11.2 dB)
    assert 0 < hist[-1]["codes_used"] <= 16384
    record = json.loads((tmp_path / "vq" / TRAINING_FILE).read_text())
    assert record["vq_train"]["seed"] == 3 and record["vq_train"] == json.loads(json.dumps(cfg.__dict__))
    assert record["sources"] == ["astronaut", "coffee"]
    assert record["architecture"]["block_out_channels"] == list(tiny_cfg.vq.block_out_channels)
    assert "vq_train.seed=3" in (tmp_path / "vq" / "README.md").read_text()
    loaded = VQTokenizer.load(tmp_path / "vq")
    assert reconstruction_psnr(loaded, reference_crop()) == pytest.approx(record["reference"]["psnr_y"], abs=1e-3)
    assert torch.allclose(loaded.codebook.weight.norm(dim=1), torch.ones(16384), atol=1e-5)


def test_shipped_weights_are_the_demo_default_and_reproduce_their_recorded_psnr(tiny_cfg):
    assert tiny_cfg.vq.checkpoint == "builtin:tiny-vq"
    record = json.loads((BUILTIN_VQ["tiny-vq"] / TRAINING_FILE).read_text())
    trained = vq_from_config(tiny_cfg.vq)
    psnr = reconstruction_psnr(trained, reference_crop())
    assert psnr == pytest.approx(record["reference"]["psnr_y"], abs=0.1)
    # and it is a trained tokenizer: far above the random one the same config builds without it
    assert psnr > reconstruction_psnr(VQTokenizer(replace(tiny_cfg.vq, checkpoint="")), reference_crop()) + 5.0


def test_shipped_codebook_has_llamagen_vq8_shape_and_normalisation(tiny_cfg):
    book = vq_from_config(tiny_cfg.vq).codebook.weight
    llamagen = VQConfig()  # the defaults are LlamaGen VQ_8
    assert tuple(book.shape) == (llamagen.codebook_size, llamagen.codebook_dim) == (16384, 8)
    assert torch.allclose(book.norm(dim=1), torch.ones(16384), atol=1e-5)


def test_missing_or_corrupt_weights_name_the_file_and_the_config_key(tiny_cfg, tmp_path, capsys):
    from cluster.config import ConfigError, load_config

    folder = tmp_path / "vq"
    shutil.copytree(BUILTIN_VQ["tiny-vq"], folder)
    cfg = replace(tiny_cfg.vq, checkpoint=str(folder))
    (folder / "vq_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VQCheckpointError, match=r"vq\.checkpoint=.*vq_model\.safetensors is not a readable safetensors"):
        vq_from_config(cfg)
    (folder / "vq_model.safetensors").unlink()
    with pytest.raises(VQCheckpointError, match=r"vq\.checkpoint=.*has no vq_model\.safetensors"):
        vq_from_config(cfg)
    # a command says it in one line (rc 2), not with a traceback from deep inside
    from app.cli import main as cli_main

    assert cli_main(["init-policy", "--out", str(tmp_path / "out"), f"vq.checkpoint={folder}"]) == 2
    assert "has no vq_model.safetensors" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'vq\.checkpoint'.*no such file"):
        load_config(overrides=[f"vq.checkpoint={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"'vq\.checkpoint'.*no built-in tokenizer 'tiny'"):
        load_config(overrides=["vq.checkpoint=builtin:tiny"])


def test_a_run_folder_keeps_the_tokenizer_its_policy_learned(tmp_path):
    from cluster.config import load_config
    from training.jobs import ensure_vq_dir

    trained = load_config(overrides=[f"run_dir={tmp_path}"])
    out = ensure_vq_dir(trained)
    assert ensure_vq_dir(trained) == out  # the same tokenizer again: fine
    with pytest.raises(VQCheckpointError, match="another VQ tokenizer than the configured one"):
        ensure_vq_dir(load_config(overrides=[f"run_dir={tmp_path}", "vq.checkpoint=''"]))
