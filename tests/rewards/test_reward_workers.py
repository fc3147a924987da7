"""Reward workers on a real local Ray, in the IQA environment (pyiqa), with the tiny VQ."""

import numpy as np
import pytest
import ray
import skimage.data
from PIL import Image, ImageFilter

from cluster.config import EnvConfig
from cluster.interpreters import runtime_env_for_iqa
from cluster.reward_pool import RewardPool
from rewards.config import RewardsConfig
from rewards.scoring import RewardInput
from tests.rewards.helpers import make_trace, parsed_of, parsed_of_ids

pytestmark = pytest.mark.slow
LABELS = ["medium", "downsample", "heavy", "light", "upsample"]


@pytest.fixture(scope="module")
def vq_dir(tiny_vq, tmp_path_factory):
    return str(tiny_vq.save(tmp_path_factory.mktemp("vq") / "vq"))


def small_cfg(**kw):
    return RewardsConfig(**{"num_cpus": 0.5, "batch_size": 2, **kw})


@pytest.fixture(scope="module")
def pool(ray_local, vq_dir):
    p = RewardPool(small_cfg(num_workers=2), vq_dir, runtime_env_for_iqa(EnvConfig()))
    yield p
    p.shutdown()


def batch_of(policy, n=5):
    out = []
    for i in range(n):
        trace = make_trace(seed=i, rough=["A cat.", "Two dogs.", "A tree"][i % 3])
        out.append(RewardInput(f"s{i}", parsed_of(trace, policy), LABELS, ["cat", "tree"]))
    out.append(RewardInput("broken", parsed_of_ids([7, 8, 9], policy), LABELS, ["cat"]))
    return out


def test_offline_iqa_prefers_clean_images(pool):
    clean = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((192, 128)))
    blurred = np.asarray(Image.fromarray(clean).filter(ImageFilter.GaussianBlur(3)))
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 30, clean.shape), 0, 255).astype(np.uint8)
    (c, raw_c), (b, _), (n, _) = pool.score_images([clean, blurred, noisy])
    assert set(raw_c) == {"piqe", "niqe"}
    assert 0.0 <= b < c <= 1.0 and 0.0 <= n < c


def test_pool_scores_every_sample_and_batch_equals_single(pool, tiny_policy):
    batch = batch_of(tiny_policy)
    together = pool.score(batch)
    assert [r.sample_id for r in together] == [b.sample_id for b in batch]
    alone = [pool.score([b])[0] for b in batch]
    assert [r.total for r in together] == [r.total for r in alone]  # exactly: no batch-mate effects
    good, broken = together[0], together[-1]
    assert good.components["format"] == 1.0 and good.components["degradation"] == 1.0
    assert 0.0 < good.components["generation"] <= 1.0  # the decoded final image was scored
    assert set(good.details["generation"]) == {"piqe", "niqe"}
    assert broken.total == 0.0 and all(v == 0.0 for v in broken.components.values())


def test_images_come_back_on_request(pool, tiny_policy):
    res = pool.score(batch_of(tiny_policy, 2)[:1], return_images=True)
    assert res[0].final_image.shape == (128, 128, 3) and res[0].final_image.dtype == np.uint8


def test_killed_actor_is_replaced_and_the_batch_still_scores(ray_local, vq_dir, tiny_policy):
    p = RewardPool(small_cfg(num_workers=1, batch_size=3), vq_dir, runtime_env_for_iqa(EnvConfig()))
    try:
        batch = batch_of(tiny_policy, 8)
        handle = p.submit(batch)
        ray.kill(p.workers[0])  # mid-batch: its chunks are in flight or queued
        results = p.collect(handle)
        assert [r.sample_id for r in results] == [b.sample_id for b in batch]
        assert p.restarts >= 1 and p.retries >= 1
        assert results[0].components["generation"] > 0
    finally:
        p.shutdown()


def test_semantic_understanding_in_the_reward_env(ray_local, tiny_policy):
    cfg = small_cfg(num_workers=1, understanding_mode="semantic")
    cfg.weights["generation"] = 0.0
    p = RewardPool(cfg, None, runtime_env_for_iqa(EnvConfig()))
    try:
        sample = RewardInput("k", parsed_of(make_trace(rough="A kitten sleeps on a sofa."), tiny_policy), LABELS,
                             ["cat", "couch", "airplane"])
        r = p.score([sample])[0]
        assert r.components["understanding"] == pytest.approx(2 / 3)
        assert r.details["understanding"]["missed"] == ["airplane"]
    finally:
        p.shutdown()


def test_a_plugin_that_cannot_load_stops_the_pool_with_its_key(ray_local, tmp_path):
    (tmp_path / "bad_reward.py").write_text("import no_such_module_here\n")
    cfg = small_cfg(num_workers=1, weights={"format": 1.0, "mine": 1.0},
                    plugins={"mine": f"{tmp_path / 'bad_reward.py'}:score"})
    with pytest.raises(RuntimeError, match=r"failed to start.*rewards.plugins.mine: cannot load.*no_such_module_here"):
        RewardPool(cfg, None, runtime_env_for_iqa(EnvConfig()), timeout_s=120)
