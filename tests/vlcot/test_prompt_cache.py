"""Prompt codes encoded once (vlcot/prompt_cache.py): a second start reads them, a changed LR
file or another tokenizer is encoded again, a damaged cache is rebuilt with a warning."""

import dataclasses
import logging

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlcot.prompt_cache import cached_prompt_codes
from vlcot.vq import VQTokenizer

SIZE = 64


@pytest.fixture
def lr_files(tmp_path):
    img = skimage.data.astronaut()
    paths = []
    for i in range(3):
        p = tmp_path / "lr" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(img[i * 100:i * 100 + 128, 50:178]).resize((16, 16)).save(p)
        paths.append(str(p))
    return paths


def _fresh(vq, paths):
    return [vq.encode_images([Image.open(p)], SIZE)[0] for p in paths]


def test_codes_are_encoded_once_and_again_only_when_something_changed(lr_files, tiny_vq, tmp_path, caplog):
    cache = tmp_path / "prompt_codes"
    codes, encoded = cached_prompt_codes(lr_files, tiny_vq, SIZE, cache)
    assert encoded == 3
    for got, want in zip(codes, _fresh(tiny_vq, lr_files)):
        np.testing.assert_array_equal(got, want)
    again, encoded = cached_prompt_codes(lr_files[::-1], tiny_vq, SIZE, cache)  # any order, any subset
    assert encoded == 0
    for got, want in zip(again, codes[::-1]):
        np.testing.assert_array_equal(got, want)
    # an LR image rewritten since: only it is encoded again, to its new codes
    Image.fromarray(skimage.data.coffee()[:128, :128]).resize((16, 16)).save(lr_files[1])
    changed, encoded = cached_prompt_codes(lr_files, tiny_vq, SIZE, cache)
    assert encoded == 1
    np.testing.assert_array_equal(changed[1], _fresh(tiny_vq, lr_files[1:2])[0])
    assert not np.array_equal(changed[1], codes[1])
    # another tokenizer (or prompt size) never reads these codes
    other = VQTokenizer(dataclasses.replace(tiny_vq.cfg, seed=tiny_vq.cfg.seed + 1))
    assert cached_prompt_codes(lr_files, other, SIZE, cache)[1] == 3
    assert cached_prompt_codes(lr_files, tiny_vq, SIZE // 2, cache)[1] == 3
    # a damaged cache file: encoded again, with a warning naming it
    for f in cache.glob("*.npz"):
        f.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        assert cached_prompt_codes(lr_files, tiny_vq, SIZE, cache)[1] == 3
    assert "unreadable" in caplog.text
