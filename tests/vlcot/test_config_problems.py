"""vlcot's own config checks (vlcot/config_problems.py): every problem of the task sections as
(full key, message), none for the defaults, and no crash on values other checks divide by."""

from __future__ import annotations

import json
from dataclasses import replace

from vlcot.config import (AnnotateConfig, DataConfig, DegradationConfig, ImageConfig, PolicyConfig, TextModelConfig,
                          VQConfig, VQTrainConfig)
from vlcot.config_problems import problems


def task(**changed):
    sections = dict(image=ImageConfig(), vq=VQConfig(), policy=PolicyConfig(), degradation=DegradationConfig(),
                    data=DataConfig(), annotate=AnnotateConfig(), vq_train=VQTrainConfig())
    sections.update(changed)
    return problems(**sections)


def test_the_paper_defaults_have_no_problems():
    assert task() == []


def test_every_section_reports_its_problems_together():
    found = task(image=ImageConfig(lr_size=100), vq=VQConfig(weights="latest"),
                 policy=PolicyConfig(dtype="int8", model=TextModelConfig(text_vocab_size=100)),
                 data=DataConfig(crop_min_scale=0.0), vq_train=VQTrainConfig(crop=60))
    assert [key for key, _ in found] == ["image.lr_size", "vq.weights", "policy.dtype", "policy.model.text_vocab_size",
                                         "data.crop_min_scale", "vq_train.crop"]
    assert "must divide hr_size 512, got 100" in found[0][1]


def test_patch_arithmetic_with_a_zero_patch_is_one_problem():
    found = task(image=ImageConfig(patch_px=0))
    assert found == [("image.patch_px", "must be positive, got 0")]  # not a modulo by zero, nor max_grid
    assert [k for k, _ in task(image=ImageConfig(hr_size=4096))] == ["policy.special_tokens.max_grid"]  # 128 > 64


def test_a_policy_folder_is_checked_without_loading_it(tmp_path):
    assert [k for k, _ in task(policy=PolicyConfig(checkpoint=str(tmp_path)))] == ["policy.checkpoint"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LuminaMGPT"]}))
    (key, why), = task(policy=PolicyConfig(checkpoint=str(tmp_path)))
    assert key == "policy.checkpoint" and "import-policy --src" in why
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ChameleonForConditionalGeneration"]}))
    assert task(policy=replace(PolicyConfig(), checkpoint=str(tmp_path))) == []
