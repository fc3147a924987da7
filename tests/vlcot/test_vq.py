import numpy as np
import pytest
import torch
from PIL import Image

from vlcot.config import VQConfig
from vlcot.vq import VQTokenizer, llamagen_to_diffusers


def test_shapes_and_ranges(tiny_vq):
    x = torch.rand(3, 3, 128, 64) * 2 - 1
    codes = tiny_vq.encode(x)
    assert codes.shape == (3, 16, 8) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 16384
    out = tiny_vq.decode(codes)
    assert out.shape == (3, 3, 128, 64)
    assert out.min() >= -1 and out.max() <= 1


def test_batched_equals_single(tiny_vq):
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    batched = tiny_vq.encode(x)
    for i in range(4):
        assert torch.equal(batched[i], tiny_vq.encode(x[i:i + 1])[0])


def test_quantize_is_l2_normalised_nearest_neighbour(tiny_vq):
    # Latents that are scaled copies of codebook entries must map back to those entries,
    # whatever the scale (the lookup normalises both sides).
    idx = torch.tensor([[3, 500], [16383, 42]])
    entries = torch.nn.functional.normalize(tiny_vq.codebook.weight, dim=-1)[idx]  # [2, 2, d]
    scales = torch.tensor([[0.01, 7.0], [100.0, 0.5]])[..., None]
    z = (entries * scales).permute(2, 0, 1)[None]
    assert torch.equal(tiny_vq.quantize(z)[0], idx)


def test_encode_rejects_bad_sizes(tiny_vq):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_vq.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="codes outside"):
        tiny_vq.decode(torch.tensor([[[16384]]]))


def test_pil_helpers_handle_any_mode(tiny_vq):
    imgs = [Image.new("RGBA", (40, 30), (255, 0, 0, 0)), Image.new("L", (50, 50), 128), Image.new("RGB", (10, 90))]
    codes = tiny_vq.encode_images(imgs, 64, batch_size=2)
    assert codes.shape == (3, 8, 8)
    # a fully transparent image composites to white: same codes as a white RGB image
    white = tiny_vq.encode_images([Image.new("RGB", (40, 30), "white")], 64)
    np.testing.assert_array_equal(codes[0], white[0])
    assert tiny_vq.decode_images(codes[:1])[0].size == (64, 64)


def test_save_and_load_roundtrip(tiny_vq, tmp_path):
    tiny_vq.save(tmp_path / "vq")
    again = VQTokenizer.load(tmp_path / "vq")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(again.encode(x), tiny_vq.encode(x))


def llamagen_state_dict(cfg: VQConfig, seed=0):
    """A state dict in LlamaGen's VQModel layout (tokenizer/tokenizer_image/vq_model.py),
    written from that architecture's description, not from our key mapping."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {}

    def norm(prefix, c):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = r(c), r(c)

    def conv(prefix, cin, cout, k):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = r(cout, cin, k, k), r(cout)

    def res(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin); conv(f"{prefix}.conv1", cin, cout, 3)
        norm(f"{prefix}.norm2", cout); conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cin, cout, 1)

    def attn(prefix, c):
        norm(f"{prefix}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.{n}", c, c, 1)

    ch = cfg.block_out_channels
    L, nres, z = len(ch), cfg.layers_per_block, cfg.z_channels
    conv("encoder.conv_in", 3, ch[0], 3)
    cin = ch[0]
    for i in range(L):
        for j in range(nres):
            res(f"encoder.conv_blocks.{i}.res.{j}", cin, ch[i]); cin = ch[i]
            if i == L - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i != L - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    res("encoder.mid.0", cin, cin); attn("encoder.mid.1", cin); res("encoder.mid.2", cin, cin)
    norm("encoder.norm_out", cin); conv("encoder.conv_out", cin, z, 3)

    cin = ch[-1]
    conv("decoder.conv_in", z, cin, 3)
    res("decoder.mid.0", cin, cin); attn("decoder.mid.1", cin); res("decoder.mid.2", cin, cin)
    for k, i in enumerate(reversed(range(L))):
        for j in range(nres + 1):
            res(f"decoder.conv_blocks.{k}.res.{j}", cin, ch[i]); cin = ch[i]
            if i == L - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin); conv("decoder.conv_out", cin, 3, 3)

    sd["quantize.embedding.weight"] = r(cfg.codebook_size, cfg.codebook_dim)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    conv("quant_conv", z, cfg.codebook_dim, 1)
    conv("post_quant_conv", cfg.codebook_dim, z, 1)
    return sd


def test_loads_llamagen_checkpoint_layout(tiny_cfg, tmp_path):
    cfg = tiny_cfg.vq
    src = llamagen_state_dict(cfg)
    path = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": src}, path)
    vq = VQTokenizer.load(path, cfg)  # strict: every key must land
    ours = vq.state_dict()
    checks = {
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": "encoder.down_blocks.2.resnets.0.conv_shortcut.weight",
        "encoder.conv_blocks.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid.2.conv2.bias": "encoder.mid_block.resnets.1.conv2.bias",
        "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
        "decoder.conv_blocks.0.res.1.conv1.weight": "decoder.up_blocks.0.resnets.1.conv1.weight",
        "decoder.conv_blocks.2.upsample.conv.bias": "decoder.up_blocks.2.upsamplers.0.conv.bias",
        "decoder.conv_blocks.0.attn.1.norm.bias": "decoder.up_blocks.0.attentions.1.group_norm.bias",
        "quantize.embedding.weight": "codebook.weight",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for theirs, mine in checks.items():
        assert torch.equal(ours[mine], src[theirs]), theirs
    # attention projections: 1x1 convs become linear layers
    assert torch.equal(ours["encoder.mid_block.attentions.0.to_out.0.weight"], src["encoder.mid.1.proj_out.weight"][:, :, 0, 0])
    assert torch.equal(ours["encoder.down_blocks.3.attentions.0.to_q.weight"], src["encoder.conv_blocks.3.attn.0.q.weight"][:, :, 0, 0])
    # LlamaGen's quantizer L2-normalises codes: decoding uses the normalised entry
    z = torch.nn.functional.normalize(src["quantize.embedding.weight"][7], dim=0)
    assert torch.allclose(vq._normalised_codebook()[7], z)


def test_llamagen_mapping_rejects_unknown_keys(tiny_cfg, tmp_path):
    src = llamagen_state_dict(tiny_cfg.vq)
    src["encoder.something_else.weight"] = torch.zeros(1)
    torch.save(src, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="something_else"):
        VQTokenizer.load(tmp_path / "bad.pt", tiny_cfg.vq)
    assert "codebook.weight" in llamagen_to_diffusers({"quantize.embedding.weight": torch.zeros(2, 2)})


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="VQ checkpoint not found"):
        VQTokenizer.load(tmp_path / "nope.pt")


def test_loads_a_llamagen_training_checkpoint_with_args_and_ema(tiny_cfg, tmp_path):
    """LlamaGen's vq_train.py saves {model, optimizer, steps, args (a Namespace)[, ema]}: it loads
    with weights_only (the Namespace allow-listed), `model` by default as PURE does, `ema` on request."""
    import argparse
    import dataclasses

    model_sd = llamagen_state_dict(tiny_cfg.vq, seed=1)
    ema_sd = llamagen_state_dict(tiny_cfg.vq, seed=2)
    path = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": model_sd, "ema": ema_sd, "optimizer": {"state": {}}, "steps": 400000,
                "args": argparse.Namespace(vq_model="VQ-8", codebook_size=16384, lr=1e-4)}, path)
    got = VQTokenizer.load(path, tiny_cfg.vq).state_dict()["codebook.weight"]
    assert torch.equal(got, model_sd["quantize.embedding.weight"])
    ema_cfg = dataclasses.replace(tiny_cfg.vq, weights="ema")
    got = VQTokenizer.load(path, ema_cfg).state_dict()["codebook.weight"]
    assert torch.equal(got, ema_sd["quantize.embedding.weight"])
    torch.save({"model": model_sd}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no 'ema' weights"):
        VQTokenizer.load(tmp_path / "no_ema.pt", ema_cfg)


class _Payload:  # a global that is not allow-listed: must never be unpickled
    pass


def test_vq_file_with_other_objects_is_refused(tiny_cfg, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": llamagen_state_dict(tiny_cfg.vq), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="not loaded"):
        VQTokenizer.load(path, tiny_cfg.vq)
