import math

import numpy as np
import pytest

from rewards.config import RewardsConfig
from rewards.scoring import RewardInput, RewardScorer
from rewards.text import degradation_reward, format_reward, singular, understanding_reward
from tests.rewards.helpers import make_trace, parsed_of, parsed_of_ids

LABELS = ["medium", "downsample", "heavy", "light", "upsample"]


def test_paper_degradation_example(tiny_policy):
    # three of five slots right -> 3/5 = 0.6
    predicted = ("medium", "upsample", "heavy", "none", "upsample")
    score, details = degradation_reward(parsed_of(make_trace(predicted), tiny_policy), LABELS)
    assert score == pytest.approx(0.6)
    assert details["per_slot"] == {"blur": 1.0, "resize": 0.0, "noise": 1.0, "compression": 0.0, "final_resize": 1.0}


def test_paper_understanding_example(tiny_policy):
    # three of four reference tags mentioned -> 0.75, across case and plural forms
    p = parsed_of(make_trace(rough="Two Cats sit under some TREES next to a dog."), tiny_policy)
    score, details = understanding_reward(p, ["cat", "tree", "dog", "car"])
    assert score == pytest.approx(0.75)
    assert details["missed"] == ["car"]


def test_degradation_ordinal_credit(tiny_policy):
    predicted = ("heavy", "downsample", "heavy", "light", "keep")  # blur off by one level, final resize wrong
    p = parsed_of(make_trace(predicted), tiny_policy)
    assert degradation_reward(p, LABELS)[0] == pytest.approx(3 / 5)
    assert degradation_reward(p, LABELS, ordinal=True)[0] == pytest.approx((2 / 3 + 1 + 1 + 1 + 0) / 5)


def test_format_strict_and_shaped(tiny_policy):
    full = parsed_of(make_trace(), tiny_policy)
    assert format_reward(full) == (1.0, {"strict": True})
    assert format_reward(full, shaped=True)[0] == 1.0
    codec = tiny_policy.codec
    ids = codec.encode_text("<degradation>medium blur, downsample, heavy noise, light compression, upsample</degradation>"
                            "<rough_understand>a cat</rough_understand>")
    partial = parsed_of_ids(ids, tiny_policy)
    assert format_reward(partial)[0] == 0.0
    assert format_reward(partial, shaped=True)[0] == pytest.approx(2 / 7)
    swapped = parsed_of_ids(codec.encode_text("<rough_understand>a</rough_understand><degradation>medium blur, "
                                              "downsample, heavy noise, light compression, upsample</degradation>"), tiny_policy)
    assert format_reward(swapped, shaped=True)[0] == pytest.approx(1 / 7)  # out of order: only one counts


@pytest.mark.parametrize("ids", [[], [5, 6, 7], list(range(0, 600, 3))])
def test_malformed_and_empty_traces_score_zero(tiny_policy, ids):
    p = parsed_of_ids(ids, tiny_policy)
    assert format_reward(p)[0] == 0.0
    assert degradation_reward(p, LABELS)[0] == 0.0
    assert understanding_reward(p, ["cat"])[0] == 0.0
    assert "invalid" in degradation_reward(p, LABELS)[1]


def test_understanding_edge_cases(tiny_policy):
    p = parsed_of(make_trace(rough="Three mice and a fire truck near the boxes."), tiny_policy)
    assert understanding_reward(p, ["mouse", "fire truck", "box"])[0] == 1.0
    assert understanding_reward(p, ["truck fire"])[0] == 0.0  # multi-word tags keep their order
    assert understanding_reward(p, [])[0] == 0.0  # no reference: 0 with a reason, not a crash
    assert understanding_reward(p, ["ice"])[0] == 0.0  # no substring matches ("mice")


@pytest.mark.parametrize("plural,single", [("cats", "cat"), ("boxes", "box"), ("berries", "berry"), ("leaves", "leaf"),
                                           ("glass", "glass"), ("bus", "bus"), ("dishes", "dish"), ("people", "person")])
def test_singular(plural, single):
    assert singular(plural) == single


def test_semantic_matcher_only_adds_missed_tags(tiny_policy):
    seen = []

    def matcher(text, tags):  # stands in for the MiniLM matcher (tested in the IQA env)
        seen.append(list(tags))
        return [t == "couch" for t in tags]

    p = parsed_of(make_trace(rough="A cat on a sofa."), tiny_policy)
    score, details = understanding_reward(p, ["cat", "couch", "plane"], matcher)
    assert score == pytest.approx(2 / 3)
    assert seen == [["couch", "plane"]]  # literal hits are not re-checked
    assert details["found"] == ["cat", "couch"]


class NaNIQA:
    """IQA stand-in returning NaN for the second image: exercises the bookkeeping around IQA."""

    def score(self, images, refs=None):
        return [(0.5 if i != 1 else float("nan"), {"fake": 1.0}) for i in range(len(images))]


class IdentityVQ:
    def decode(self, codes):
        import torch
        c = torch.as_tensor(codes).float()
        return (c / 16384.0 * 2 - 1)[:, None].repeat(1, 3, 1, 1)


def test_weights_totals_and_nonfinite(tiny_policy):
    cfg = RewardsConfig()
    cfg.weights.update(format=1.0, degradation=2.0, understanding=0.5, generation=3.0)
    scorer = RewardScorer(cfg, vq=IdentityVQ(), iqa=NaNIQA())
    batch = [RewardInput(f"s{i}", parsed_of(make_trace(seed=i), tiny_policy), LABELS, ["cat", "dog"]) for i in range(3)]
    batch.append(RewardInput("bad", parsed_of_ids([1, 2, 3], tiny_policy), LABELS, ["cat"]))
    res = scorer.score(batch)
    assert [r.sample_id for r in res] == ["s0", "s1", "s2", "bad"]
    r0 = res[0]
    assert r0.components == {"format": 1.0, "degradation": 1.0, "understanding": 0.5, "generation": 0.5}
    assert r0.total == pytest.approx(1 * 1 + 2 * 1 + 0.5 * 0.5 + 3 * 0.5)
    assert res[1].nonfinite == ["generation"] and res[1].components["generation"] == 0.0
    assert math.isfinite(res[1].total) and scorer.nonfinite_count == 1
    assert res[3].total == 0.0 and res[3].components["generation"] == 0.0
    assert "invalid" in res[3].details["generation"]


def test_batch_equals_per_sample(tiny_policy):
    scorer = RewardScorer(RewardsConfig(), vq=IdentityVQ(), iqa=NaNIQA.__new__(NaNIQA))
    scorer.resources.iqa.score = lambda imgs, refs=None: [(float(np.asarray(im).mean()) / 255.0, {}) for im in imgs]
    batch = [RewardInput(f"s{i}", parsed_of(make_trace(seed=i, rough=["A cat.", "A dog.", "Cats!"][i]), tiny_policy),
                         LABELS, ["cat"]) for i in range(3)]
    together = scorer.score(batch)
    alone = [scorer.score([b])[0] for b in batch]
    assert [r.total for r in together] == [r.total for r in alone]
    assert [r.components for r in together] == [r.components for r in alone]


def test_a_plugin_reward_is_weighted_logged_and_guarded(tiny_policy, tmp_path):
    from cluster.config import ConfigError, load_config

    (tmp_path / "mine.py").write_text(
        "def words(batch):\n    return [float(len(s.tags)) for s in batch]\n"
        "def broken(batch):\n    raise RuntimeError('boom')\n"
        "def short(batch):\n    return [1.0]\n")
    cfg = RewardsConfig(weights={"format": 1.0, "words": 0.25, "broken": 1.0, "short": 1.0},
                        plugins={"words": f"{tmp_path / 'mine.py'}:words", "broken": f"{tmp_path / 'mine.py'}:broken",
                                 "short": f"{tmp_path / 'mine.py'}:short"})
    scorer = RewardScorer(cfg)
    batch = [RewardInput(f"s{i}", parsed_of(make_trace(seed=i), tiny_policy), LABELS, ["cat", "dog"][: i + 1])
             for i in range(2)]
    res = scorer.score(batch)
    assert [r.components["words"] for r in res] == [1.0, 2.0]
    assert [r.total for r in res] == [1.0 + 0.25 * 1, 1.0 + 0.25 * 2]  # broken and short count 0 (non-finite)
    assert res[0].nonfinite == ["broken", "short"] and scorer.nonfinite_count == 4
    assert "boom" in res[0].details["broken"]["error"] and "returned 1 scores for 2" in res[1].details["short"]["error"]
    # config validation names the key: unknown reward, plug-in without weight, missing file, bad form
    for overrides, key in ((["rewards.weights.mystery=1"], "rewards.weights.mystery"),
                           ([f"rewards.plugins.extra={tmp_path / 'mine.py'}:words"], "rewards.plugins.extra"),
                           (["rewards.plugins.gone=/no/such.py:fn", "rewards.weights.gone=1"], "rewards.plugins.gone"),
                           (["rewards.plugins.bad=nocolon", "rewards.weights.bad=1"], "rewards.plugins.bad"),
                           (["rewards.plugins.format=x.py:fn"], "rewards.plugins.format")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides=overrides)
    assert load_config(overrides=["rewards.plugins.pkg=tests.rewards.helpers:make_trace", "rewards.weights.pkg=0"])
    with pytest.raises(ValueError, match=r"rewards.plugins.nofn: cannot load .* has no function 'nope'"):
        RewardScorer(RewardsConfig(weights={"nofn": 1.0}, plugins={"nofn": f"{tmp_path / 'mine.py'}:nope"}))
