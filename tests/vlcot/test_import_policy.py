"""`import-policy` on a checkpoint written in the released PURE / Lumina-mGPT layout."""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.released_checkpoint import HIGH_BASE, reference_state_dict, write_released_checkpoint
from vlcot.importer import ImportRefused, import_policy
from vlcot.policy import MINIMAL_CHAMELEON_VQ, UnmaskedChameleonForConditionalGeneration, load_policy
from vlcot.trace import build_prompt, parse_response, serialise_response


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("released") / "PURE-tiny")


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "policy"
    report = import_policy(released, out, max_shard_bytes=4 << 20)
    return out, report


def _reference_model(released):
    """The released weights in a Chameleon built here from the released config.json, with the
    norms repeated over heads by the test (not by the import code)."""
    from transformers import ChameleonConfig

    raw = json.loads((released / "config.json").read_text())
    raw.pop("architectures")
    raw["vq_config"] = MINIMAL_CHAMELEON_VQ
    model = UnmaskedChameleonForConditionalGeneration(ChameleonConfig(**raw)).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in reference_state_dict(released).items()},
                                                strict=False)
    assert not unexpected and all(k.startswith("model.vqmodel.") for k in missing)
    return model


def test_import_rewrites_what_the_engines_cannot_read(released, imported):
    out, report = imported
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["ChameleonForConditionalGeneration"]
    assert raw["max_position_embeddings"] == 11776 and raw["realsr_conversation"] == "lumina"
    assert len(report.shards) > 1 and (out / "model.safetensors.index.json").is_file()
    # a shard never held more than its bound plus one tensor (the largest is 73,728 x 64 bf16 = 9.4 MB)
    assert report.peak_shard_bytes <= (4 << 20) + 73728 * 64 * 2
    policy = load_policy(out)
    sd = policy.model.state_dict()
    assert tuple(sd["model.layers.0.self_attn.q_norm.weight"].shape) == (2, 32)
    assert tuple(sd["model.layers.1.self_attn.k_norm.bias"].shape) == (2, 32)
    assert any(k.startswith("model.vqmodel.") for k in sd)  # present, so vLLM finds every parameter
    lay = policy.layout
    assert lay.codebook_size == 16384
    assert lay.codes_to_ids([0, 8191, 8192, 16383]).tolist() == [4, 8195, HIGH_BASE, HIGH_BASE + 8191]
    assert (lay.image_start, lay.image_end, lay.row_newline, lay.grid_token(16)) == (8197, 8196, 8803, 8820)
    assert any("[1, head_dim] -> [heads, head_dim]" in c for c in report.changes)


def test_imported_logits_equal_a_hand_built_reference(released, imported):
    out, _ = imported
    policy = load_policy(out)
    assert policy.conversation.name == "lumina"
    rng = np.random.default_rng(0)
    prompt = build_prompt(rng.integers(0, 16384, (4, 4)), policy.codec, policy.layout)
    assert set(prompt) & set(range(HIGH_BASE, HIGH_BASE + 8192))  # codes from the high id range are in play
    ids = torch.tensor([prompt])
    with torch.no_grad():
        got = policy.model(input_ids=ids).logits
        want = _reference_model(released)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the norms matter: with the released [1, head_dim] values on head 0 only, logits differ
    broken = _reference_model(released)
    with torch.no_grad():
        broken.model.layers[0].self_attn.q_norm.weight[1:] = 1.0
        assert (broken(input_ids=ids).logits - want).abs().max() > 1e-3


def test_lumina_conversation_wraps_prompt_and_response(imported):
    from tests.rewards.helpers import make_trace

    policy = load_policy(imported[0])
    codec, lay = policy.codec, policy.layout
    prompt = build_prompt(np.zeros((4, 4), dtype=int), codec, lay)
    assert prompt[0] == 0 and prompt[-1] == 8710 and prompt.count(8710) == 1
    text = codec.decode_text([t for t in prompt if codec.is_text_token(t)])
    assert text.startswith("Perceive the degradation") and "Assistant" not in text
    assert "The low-quality image is as follows: ." in text  # the image span sits between ': ' and '.'
    response = serialise_response(make_trace(), codec, lay)
    assert response[-1] == 8710 and codec.end_token_id == 8710
    parsed = parse_response(response + [5, 6], codec, lay, hr_size=128)
    assert parsed.finished and parsed.valid and parsed.strict_format


def _refused(src, out, match, **kw):
    with pytest.raises(ImportRefused, match=match):
        import_policy(src, out, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".importing-" in p.name]


def test_bad_folders_are_refused_naming_the_file_with_nothing_written(released, tmp_path):
    _refused(tmp_path / "nowhere", tmp_path / "o1", "is not a folder")
    bare = tmp_path / "bare"
    bare.mkdir()
    _refused(bare, tmp_path / "o2", r"bare/config.json not found")

    no_shard = tmp_path / "no_shard"
    shutil.copytree(released, no_shard)
    (no_shard / "consolidated-00001-of-00002.safetensors").unlink()
    _refused(no_shard, tmp_path / "o3", "names shard consolidated-00001-of-00002.safetensors, which is not in")

    few_codes = tmp_path / "few_codes"
    shutil.copytree(released, few_codes)
    tok = json.loads((few_codes / "text_tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if not (k.startswith("IMGIMG") and v >= HIGH_BASE)}
    (few_codes / "text_tokenizer.json").write_text(json.dumps(tok))
    _refused(few_codes, tmp_path / "o4", r"text_tokenizer.json names 8192 image codes .* codebook has 16384")

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(released, wrong_shape)
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    _refused(wrong_shape, tmp_path / "o5", r"mlp.down_proj.weight has shape \[64, 176\], the model needs \[64, 128\]")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(ImportRefused, match="exists and is not empty"):
        import_policy(released, taken)
    assert (taken / "x").read_text() == "keep me"


def test_an_unconverted_release_is_named_at_config_and_load_time(released, tmp_path):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="import-policy --src"):
        load_config(None, [f"policy.checkpoint={released}"])
    with pytest.raises(ValueError, match="import-policy --src"):
        load_policy(released)


def test_config_checks_max_model_len_against_the_checkpoint(imported):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.max_model_len.*11776"):
        load_config(None, [f"policy.checkpoint={imported[0]}", "rollout.max_model_len=12288"])
    assert load_config(None, [f"policy.checkpoint={imported[0]}", "rollout.max_model_len=11776"])


def test_cli_imports_and_refuses(released, tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "cli-out"
    assert main(["import-policy", "--src", str(released), "--out", str(out), "--shard-mb", "8",
                 "--config", "configs/pure-7b.yaml", "vq.checkpoint=''", "data.input_dir=''",
                 "rewards.generation.preset=offline"]) == 0
    printed = capsys.readouterr().out
    assert "ChameleonXLLMXForConditionalGeneration -> ChameleonForConditionalGeneration" in printed
    assert f"policy.checkpoint={out}" in printed and (out / "config.json").is_file()
    assert main(["import-policy", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "refused, nothing written" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_policy_init_released_layout_goes_through_the_importer(tmp_path):
    """configs/paper-shape-cpu.yaml's starting policy: written in the released layout at the
    configured width, converted by the importer: the released vocabulary and conversation."""
    import json

    from cluster.config import ConfigError, load_config
    from training.jobs import build_initial_policy
    from vlcot.conversation import CHECKPOINT_KEY
    from vlcot.policy import load_policy

    cfg = load_config("configs/paper-shape-cpu.yaml", [f"run_dir={tmp_path}", "policy.model.num_hidden_layers=1"])
    line = build_initial_policy(cfg, tmp_path / "policy_init")
    raw = json.loads((tmp_path / "policy_init-released" / "config.json").read_text())
    assert raw["architectures"] == ["ChameleonXLLMXForConditionalGeneration"] and raw["num_hidden_layers"] == 1
    imported = json.loads((tmp_path / "policy_init" / "config.json").read_text())
    assert imported["vocab_size"] == 73728 and imported[CHECKPOINT_KEY] == "lumina"
    assert imported["hidden_size"] == 64 and imported["max_position_embeddings"] == 11776
    policy = load_policy(tmp_path / "policy_init")
    assert policy.codec.end_token_id == 8710 and "imported" in line
    with pytest.raises(ConfigError, match="policy.init"):
        load_config("configs/paper-shape-cpu.yaml", [f"run_dir={tmp_path}", "policy.init=pure"])
