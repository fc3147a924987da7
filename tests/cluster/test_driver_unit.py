"""Driver logic without actors: the advantage estimator chosen by one config line reaches the
learner's batch; the learner's configuration for async runs leaves the caller's config alone."""

from types import SimpleNamespace

import numpy as np
import pytest

from cluster.config import load_config
from cluster.driver import GRPOTrainer
from cluster.step_data import ScoredSample
from rollout.engine import Sample


@pytest.mark.parametrize("estimator,want", [
    # rewards per group: [1, 0, 0.5, 0.5] and [2, 4, 3, 3]
    ("rloo", [1 - 1 / 3, 0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5, 2 - 10 / 3, 4 - 8 / 3, 3 - 3, 3 - 3]),
    ("dr_grpo", [0.5, -0.5, 0, 0, -1, 1, 0, 0]),
])
def test_one_config_line_selects_the_estimator_in_the_driver(tmp_path, estimator, want):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"learner.grpo.advantage={estimator}", "rollout.group_size=4"])
    trainer = GRPOTrainer(cfg, progress=False)
    trainer.prompt_ids = [[1, 2, 3], [1, 2, 4]]
    trainer.tokenizer, trainer.image_ids = SimpleNamespace(pad_token_id=0), np.array([], dtype=np.int64)
    rewards = [1.0, 0.0, 0.5, 0.5, 2.0, 4.0, 3.0, 3.0]
    samples = [ScoredSample(k // 4, k // 4, Sample(k // 4, k % 4, [5, 6], [-1.0, -1.0], "stop", 0), None,
                            SimpleNamespace(total=r)) for k, r in enumerate(rewards)]
    batch, info = trainer._learner_batch(samples, 0)
    np.testing.assert_allclose(batch["advantages"], np.asarray(want, dtype=np.float32), atol=1e-6)
    assert info["samples/trained"] == 8


def test_per_reward_normalisation_reaches_the_learner_batch(tmp_path):
    """`learner.grpo.normalise=per_reward`: the driver hands each reward's values (weighted as
    the config says) to the estimator, not the total."""
    import torch

    from learner.advantages import per_reward_advantages

    cfg = load_config(None, [f"run_dir={tmp_path}", "learner.grpo.normalise=per_reward", "rollout.group_size=4"])
    trainer = GRPOTrainer(cfg, progress=False)
    trainer.prompt_ids = [[1, 2, 3], [1, 2, 4]]
    trainer.tokenizer, trainer.image_ids = SimpleNamespace(pad_token_id=0), np.array([], dtype=np.int64)
    names = list(cfg.rewards.weights)
    rng = np.random.default_rng(0)
    comps = [{n: float(rng.integers(0, 5)) / 4 for n in names} for _ in range(8)]
    samples = [ScoredSample(k // 4, k // 4, Sample(k // 4, k % 4, [5, 6], [-1.0, -1.0], "stop", 0), None,
                            SimpleNamespace(total=sum(cfg.rewards.weights[n] * c[n] for n in names), components=c))
               for k, c in enumerate(comps)]
    batch, _ = trainer._learner_batch(samples, 0)
    want, _ = per_reward_advantages("grpo", {n: torch.tensor([c[n] for c in comps]) for n in names},
                                    cfg.rewards.weights, torch.tensor([0] * 4 + [1] * 4))
    order = np.argsort(-np.abs(want.numpy()), kind="stable")[:len(batch["advantages"])]
    np.testing.assert_allclose(batch["advantages"], want.numpy()[np.sort(order)], atol=1e-6)


@pytest.mark.parametrize("max_staleness,dropped", [(1, [4, 5]), (2, [])])
def test_samples_too_many_versions_behind_are_dropped_counted_and_left_out_of_the_advantages(
        tmp_path, max_staleness, dropped):
    """Async mode: at learner version 3 with `trainer.max_staleness` 1, samples drawn by version
    1 are dropped (counted), and the group's advantages come from its fresh samples only."""
    import torch

    from learner.advantages import batch_advantages

    cfg = load_config(None, [f"run_dir={tmp_path}", "rollout.group_size=4", "learner.num_workers=1",
                             f"trainer.max_staleness={max_staleness}"])
    trainer = GRPOTrainer(cfg, progress=False)
    trainer.prompt_ids = [[1, 2, 3], [1, 2, 4]]
    trainer.tokenizer, trainer.image_ids = SimpleNamespace(pad_token_id=0), np.array([], dtype=np.int64)
    rewards, versions = [1.0, 0.0, 0.5, 0.25, 2.0, 5.0, 3.0, 4.0], [3, 3, 2, 2, 1, 1, 3, 3]
    samples = [ScoredSample(k // 4, k // 4, Sample(k // 4, k % 4, [10 + k], [-1.0], "stop", v), None,
                            SimpleNamespace(total=r)) for k, (r, v) in enumerate(zip(rewards, versions))]
    batch, info = trainer._learner_batch(samples, 3)
    kept = [k for k in range(8) if k not in dropped]
    assert info["samples/stale_dropped"] == len(dropped) and info["samples/trained"] == len(kept)
    assert info["policy/version_lag"] == pytest.approx(np.mean([3 - v for v in versions]))
    assert sorted(batch["input_ids"][:, 3] - 10) == kept  # each sample's one response token names it
    want, _ = batch_advantages("total", "grpo", torch.tensor([rewards[k] for k in kept]), {}, cfg.rewards.weights,
                               torch.tensor([k // 4 for k in kept]), cfg.learner.grpo.adv_eps)
    np.testing.assert_allclose(batch["advantages"], want.numpy(), atol=1e-6)


def test_async_learner_recomputes_old_logprobs_without_mutating_the_config(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "trainer.mode=async"])
    trainer = GRPOTrainer(cfg, progress=False)
    assert trainer.learner_config().grpo.recompute_old_logp == "always"
    assert cfg.learner.grpo.recompute_old_logp == "auto"
    sync = GRPOTrainer(load_config(None, [f"run_dir={tmp_path}", "trainer.mode=sync"]), progress=False)
    assert sync.learner_config().grpo.recompute_old_logp == "auto"


def test_sft_and_rl_manifests_default_to_the_manifest_and_a_missing_one_names_its_key(tmp_path):
    from cluster.jobs import manifest_for

    main, rl = tmp_path / "main.jsonl", tmp_path / "rl.jsonl"
    main.write_text("")
    rl.write_text("")
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.manifest={main}", f"data.rl_manifest={rl}"])
    assert (manifest_for(cfg, "sft"), manifest_for(cfg, "rl")) == (main, rl)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.manifest={main}", f"data.sft_manifest={tmp_path / 'no'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.sft_manifest .*no is not a file"):
        manifest_for(cfg, "sft")


def test_trace_metrics_count_each_span_from_the_parsed_trace(tiny_cfg, tiny_policy):
    """trace/* from a whole trace and a trace cut inside its middle image: spans counted from
    the image sizes (make_trace's rough 4x4, middle 8x8, final 16x16 codes: HR 128), 0 where malformed."""
    from cluster.metrics import trace_metrics
    from tests.rewards.helpers import make_trace
    from vlcot.trace import parse_response, serialise_response

    codec, lay, hr = tiny_policy.codec, tiny_policy.layout, 128
    full = serialise_response(make_trace(), codec, lay)
    middle_start = [i for i, t in enumerate(full) if t == lay.image_start][1]
    cut = full[:middle_start + 10]

    def scored(ids):
        return ScoredSample(0, 0, Sample(0, 0, ids, [0.0] * len(ids), "stop", 0), parse_response(ids, codec, lay, hr))

    m = trace_metrics([scored(full), scored(cut)])
    assert m["trace/response_tokens"] == (len(full) + len(cut)) / 2
    assert m["trace/rough_image_tokens"] == 4 * 5 + 4  # both: 4 rows of 4 codes + newline, 4 span tokens
    assert m["trace/middle_image_tokens"] == (8 * 9 + 4) / 2 and m["trace/final_image_tokens"] == (16 * 17 + 4) / 2
    assert m["trace/all_images_fraction"] == 0.5
