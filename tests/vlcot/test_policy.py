import json

import pytest
import torch
from transformers import ChameleonForConditionalGeneration

from vlcot.config import ImageConfig, PolicyConfig, SpecialTokenIds, VQConfig
from vlcot.policy import LAYOUT_KEY, load_policy


def test_image_logits_are_not_masked(tiny_policy):
    model, layout = tiny_policy.model, tiny_policy.layout
    ids = torch.tensor([[tiny_policy.tokenizer.bos_token_id, 10, 11, layout.image_start]])
    ours = model(ids).logits[0, -1]
    stock = ChameleonForConditionalGeneration(model.config)
    stock.load_state_dict(model.state_dict())
    theirs = stock.eval()(ids).logits[0, -1]
    codes = torch.tensor(layout.image_code_ids)
    # the stock class forbids every image code; ours leaves the computed logits
    assert (theirs[codes] == torch.finfo(theirs.dtype).min).all()
    assert torch.isfinite(ours[codes]).all() and ours[codes].std() > 0
    text = torch.arange(0, 100)
    torch.testing.assert_close(ours[text], theirs[text])
    # sampling restricted to nothing else can now return image codes
    assert torch.softmax(ours, -1)[codes].sum() > 0.5  # image codes are most of the vocabulary


def test_vocabulary_covers_text_specials_and_codes(tiny_policy):
    cfg, layout = tiny_policy.model.config, tiny_policy.layout
    assert cfg.vocab_size % 64 == 0
    assert max(layout.image_code_ids) < cfg.vocab_size
    assert len(tiny_policy.tokenizer) <= layout.image_start  # text ids come first
    assert layout.codebook_size == 16384
    assert cfg.architectures == ["ChameleonForConditionalGeneration"]


def test_save_load_roundtrip(tiny_policy, tmp_path):
    tiny_policy.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["architectures"] == ["ChameleonForConditionalGeneration"]  # not our subclass's name
    again = load_policy(tmp_path / "p")
    assert again.layout == tiny_policy.layout
    ids = torch.tensor([[1, 20, 30, tiny_policy.layout.image_start, tiny_policy.layout.image_code_ids[5]]])
    torch.testing.assert_close(again.model(ids).logits, tiny_policy.model(ids).logits, rtol=0, atol=0)
    assert again.codec.encode_text("<rough_image> a cat") == tiny_policy.codec.encode_text("<rough_image> a cat")


def test_external_checkpoint_layout_from_config(tiny_cfg, tiny_policy, tmp_path):
    """A checkpoint without our layout key (as PURE / Lumina-mGPT ship) takes the special
    token ids from config and finds image codes by their IMGIMG names."""
    tiny_policy.save(tmp_path / "ext")
    cfg_path = tmp_path / "ext" / "config.json"
    raw = json.loads(cfg_path.read_text())
    stored = raw.pop(LAYOUT_KEY)
    cfg_path.write_text(json.dumps(raw))
    special = SpecialTokenIds(image_start=stored["image_start"], image_end=stored["image_end"],
                              row_newline=stored["row_newline"], grid_base=stored["grid_base"], max_grid=stored["max_grid"])
    pol = load_policy(tmp_path / "ext", PolicyConfig(special_tokens=special), tiny_cfg.image, VQConfig())
    assert pol.layout == tiny_policy.layout
    # with the Lumina defaults the tiny vocabulary has no token 8197: a clear error, not garbage
    with pytest.raises(ValueError):
        load_policy(tmp_path / "ext", PolicyConfig(), ImageConfig(), VQConfig())


def test_missing_checkpoint_and_vocabulary(tiny_policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path / "nothing")
    tiny_policy.save(tmp_path / "novocab")
    raw = json.loads((tmp_path / "novocab" / "config.json").read_text())
    raw["vocabulary_map"] = None
    (tmp_path / "novocab" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vocabulary_map"):
        load_policy(tmp_path / "novocab")
