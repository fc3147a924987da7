"""Driver logic without actors: the learner's configuration for async runs leaves the caller's
config alone; manifests per phase; trace metrics. (The learner batch a step's samples make is
tested directly: tests/learner/test_step_batch.py.)"""

import pytest

from cluster.config import load_config
from training.driver import GRPOTrainer
from training.step_data import ScoredSample
from rewards.types import RewardResult
from rollout.engine import Sample


def test_async_learner_recomputes_old_logprobs_without_mutating_the_config(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "trainer.mode=async"])
    trainer = GRPOTrainer(cfg, progress=False)
    assert trainer.learner_config().grpo.recompute_old_logp == "always"
    assert cfg.learner.grpo.recompute_old_logp == "auto"
    sync = GRPOTrainer(load_config(None, [f"run_dir={tmp_path}", "trainer.mode=sync"]), progress=False)
    assert sync.learner_config().grpo.recompute_old_logp == "auto"


def test_sft_and_rl_manifests_default_to_the_manifest_and_a_missing_one_names_its_key(tmp_path):
    from training.jobs import manifest_for

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
    from training.step_metrics import trace_metrics
    from tests.rewards.helpers import make_trace
    from vlcot.trace import parse_response, serialise_response

    codec, lay, hr = tiny_policy.codec, tiny_policy.layout, 128
    full = serialise_response(make_trace(), codec, lay)
    middle_start = [i for i, t in enumerate(full) if t == lay.image_start][1]
    cut = full[:middle_start + 10]

    def scored(ids):
        return ScoredSample(0, 0, Sample(0, 0, ids, [0.0] * len(ids), "stop", 0), parse_response(ids, codec, lay, hr),
                            RewardResult("s", 0.0, {}))

    m = trace_metrics([scored(full), scored(cut)])
    assert m["trace/response_tokens"] == (len(full) + len(cut)) / 2
    assert m["trace/rough_image_tokens"] == 4 * 5 + 4  # both: 4 rows of 4 codes + newline, 4 span tokens
    assert m["trace/middle_image_tokens"] == (8 * 9 + 4) / 2 and m["trace/final_image_tokens"] == (16 * 17 + 4) / 2
    assert m["trace/all_images_fraction"] == 0.5
