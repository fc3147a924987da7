"""Cold-start SFT on the tiny config: traces from the built-in manifest, the real learner group."""

import dataclasses

import numpy as np
import pytest
import ray

from app.cli import main as cli_main
from learner.config import LearnerConfig, SFTConfig
from cluster.learner_group import LearnerGroup
from learner.sft import build_sft_examples, run_sft
from vlcot.data import prepare_data
from vlcot.manifest import read_manifest
from vlcot.policy import load_policy

pytestmark = pytest.mark.slow


def test_sft_lowers_the_loss(tiny_cfg, tiny_policy, tiny_vq, tmp_path):
    data = dataclasses.replace(tiny_cfg.data, output_dir=str(tmp_path / "data"))
    prepare_data(tiny_cfg.image, tiny_cfg.degradation, data, progress=False)
    records = read_manifest(tmp_path / "data" / "manifest.jsonl")
    records.append(dataclasses.replace(records[0], id="gone", hr_path=str(tmp_path / "missing.png")))
    prompts, responses, skipped = build_sft_examples(records, tiny_vq, tiny_policy.codec, tiny_policy.layout, tiny_cfg.image)
    assert len(prompts) == 11 * tiny_cfg.data.variants_per_image and len(skipped) == 1 and "gone" in skipped[0]
    policy_dir = tiny_policy.save(tmp_path / "policy")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        group = LearnerGroup(LearnerConfig(num_workers=2, zero_stage=2), str(policy_dir))
        hist = run_sft(group, prompts, responses, SFTConfig(steps=12, lr=3e-3, batch_size=4), pad_id=0,
                       image_ids=tiny_policy.layout.image_span_ids())
        losses = [h["loss/sft"] for h in hist]
        assert len(losses) == 12 and np.isfinite(losses).all()
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
        assert all(h["lr"] == 3e-3 for h in hist)
        group.shutdown()
    finally:
        ray.shutdown()


def test_cli_sft_writes_a_loadable_checkpoint(tmp_path, capsys, tiny_cfg):
    code = cli_main(["sft", "--no-progress", f"run_dir={tmp_path}", f"data.output_dir={tmp_path / 'data'}",
                     "learner.sft.steps=3", "learner.sft.batch_size=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"sft: {11 * tiny_cfg.data.variants_per_image} examples" in out and "3 steps" in out
    pol = load_policy(tmp_path / "sft" / "hf")
    assert pol.model.config.vocab_size == 17152
    assert (tmp_path / "sft" / "learner_state.json").is_file()
