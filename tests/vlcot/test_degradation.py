import copy

import numpy as np
import pytest
import skimage.data

from vlcot.config import DegradationConfig, LabelThresholds
from vlcot.degradation import (
    PoissonStates, _synthesise, degrade, label_degradation, level_decreasing, level_increasing, resize_word,
)
from vlcot.kernels import (
    gaussian_kernel, generalized_gaussian_kernel, kernel_std, plateau_kernel, sinc_kernel,
)
from vlcot.trace import SLOT_WORDS, SLOTS

HR = np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])  # 128 x 128


def test_deterministic_for_a_seed():
    cfg = DegradationConfig()
    a, pa = degrade(HR, (32, 32), cfg, seed=7)
    b, pb = degrade(HR, (32, 32), cfg, seed=7)
    c, _ = degrade(HR, (32, 32), cfg, seed=8)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert not np.array_equal(a, c)


def test_records_every_draw_and_labels_are_valid_words():
    cfg = DegradationConfig()
    for seed in range(20):
        _, p = degrade(HR, (32, 32), cfg, seed)
        for key in ("blur1", "resize1", "noise1", "jpeg1", "second_order", "final", "final_sinc", "strength"):
            assert key in p
        if p["second_order"]:
            assert {"blur2", "resize2", "noise2"} <= set(p)
        labels = label_degradation(p, cfg.thresholds)
        assert [w in SLOT_WORDS[s] for s, w in zip(SLOTS, labels)] == [True] * 5


def clean_config():
    cfg = DegradationConfig()
    for order in (cfg.first, cfg.second):
        order.blur.prob = 0.0
        order.noise_prob = 0.0
        order.jpeg_prob = 0.0
        order.resize_probs = [0.0, 0.0, 1.0]
    cfg.second_order_prob = 0.0
    cfg.final_sinc_prob = 0.0
    return cfg


def test_no_degradation_gives_none_words_and_a_plain_downsample():
    lr, p = degrade(HR, (32, 32), clean_config(), seed=0)
    assert label_degradation(p, LabelThresholds()) == ["none", "keep", "none", "none", "downsample"]
    assert p["strength"]["noise_std"] == 0 and p["strength"]["jpeg_quality"] == 100


def test_strong_settings_give_heavy_words():
    cfg = clean_config()
    cfg.first.blur.prob = 1.0
    cfg.first.blur.sinc_prob = 0.0
    cfg.first.blur.kernel_types = ["iso"]
    cfg.first.blur.kernel_probs = [1.0]
    cfg.first.blur.kernel_sizes = [41]  # 4 sigma each side: little truncation
    cfg.first.blur.sigma = [5.0, 5.0]
    cfg.first.noise_prob = 1.0
    cfg.first.gaussian_noise_prob = 1.0
    cfg.first.noise_sigma = [40.0, 40.0]
    cfg.first.jpeg_prob = 1.0
    cfg.first.jpeg_quality = [20, 20]
    cfg.first.resize_probs = [0.0, 1.0, 0.0]
    cfg.first.resize_range = [0.5, 1.0]
    _, p = degrade(HR, (32, 32), cfg, seed=0)
    labels = label_degradation(p, LabelThresholds())
    assert [labels[0], labels[2], labels[3]] == ["heavy", "heavy", "heavy"]
    assert labels[1] == resize_word(p["resize1"]["scale"], 0.05) and p["resize1"]["scale"] <= 1.0
    assert abs(p["strength"]["blur_sigma"] - 5.0) < 0.2  # measured kernel spread ~ sigma
    assert abs(p["strength"]["noise_std"] - 40.0) < 4.0
    assert p["strength"]["jpeg_quality"] == 20


def lr_measured(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.thresholds.measure = "lr"
    return cfg


def test_lr_strengths_measure_only_what_was_applied():
    """Each LR strength is the change its effect made: 0 where the effect is off, and leaving
    an effect out changes nothing else in the draw (the same LR when nothing is left out)."""
    cfg = lr_measured(clean_config())
    lr, p = degrade(HR, (32, 32), cfg, seed=0)
    assert {k: p["strength"][k] for k in ("lr_blur_rms", "lr_noise_rms", "lr_jpeg_rms")} == \
        {"lr_blur_rms": 0.0, "lr_noise_rms": 0.0, "lr_jpeg_rms": 0.0}
    assert label_degradation(p, cfg.thresholds) == ["none", "keep", "none", "none", "downsample"]
    noisy = copy.deepcopy(cfg)
    noisy.first.noise_prob, noisy.first.gaussian_noise_prob, noisy.first.noise_sigma = 1.0, 1.0, [20.0, 20.0]
    s = degrade(HR, (32, 32), noisy, seed=0)[1]["strength"]
    assert s["lr_blur_rms"] == 0.0 and s["lr_jpeg_rms"] == 0.0
    assert 2.0 < s["lr_noise_rms"] < 20.0  # the 4x downscale removes part of it (an area resize most)
    full = lr_measured(DegradationConfig())
    for seed in range(6):
        lr, p = degrade(HR, (32, 32), full, seed)
        plain, q = degrade(HR, (32, 32), DegradationConfig(), seed)  # measuring changes neither LR nor draw
        np.testing.assert_array_equal(lr, plain)
        assert {k: v for k, v in p["strength"].items() if not k.startswith("lr_")} == q["strength"]
        assert all(p["strength"][k] >= 0 for k in ("lr_blur_rms", "lr_noise_rms", "lr_jpeg_rms"))


def test_a_rerun_without_an_effect_keeps_every_other_draw():
    """Poisson noise takes an image-dependent count of random numbers: a rerun without blur
    or noise sees other pixels there, yet must draw the same JPEG qualities, resizes and
    kernels after it (the recorded stream states are replayed)."""
    cfg = DegradationConfig()
    for order in (cfg.first, cfg.second):
        order.noise_prob, order.gaussian_noise_prob = 1.0, 0.0  # Poisson in both orders
    cfg.second_order_prob = 1.0

    def drawn(p):
        p = copy.deepcopy(p)
        p.pop("strength")
        for key in ("noise1", "noise2"):
            p[key].pop("measured_std")
        return p

    for seed in range(8):
        states = PoissonStates()
        lr, p = _synthesise(HR, (32, 32), cfg, seed, frozenset(), states)
        assert len(states.states) == 2
        for effects in ({"blur"}, {"noise"}, {"jpeg"}, {"blur", "noise", "jpeg"}):
            _, q = _synthesise(HR, (32, 32), cfg, seed, frozenset(effects), PoissonStates(states.states))
            assert drawn(q) == drawn(p), (seed, effects)
        again, _ = _synthesise(HR, (32, 32), cfg, seed, frozenset(), PoissonStates(states.states))
        np.testing.assert_array_equal(again, lr)


def test_lr_strengths_grow_with_the_drawn_strength():
    """Heavier noise drawn, more noise in the LR; more blur drawn, more detail gone."""
    def mean_strength(key, **order):
        cfg = lr_measured(clean_config())
        for k, v in order.items():
            setattr(cfg.first, k, v)
        return np.mean([degrade(HR, (32, 32), cfg, seed)[1]["strength"][key] for seed in range(4)])

    noise = dict(noise_prob=1.0, gaussian_noise_prob=1.0)
    assert mean_strength("lr_noise_rms", **noise, noise_sigma=[30.0, 30.0]) > \
        2 * mean_strength("lr_noise_rms", **noise, noise_sigma=[5.0, 5.0])
    jpeg = dict(jpeg_prob=1.0, resize_probs=[0.0, 1.0, 0.0], resize_range=[0.25, 1.0])  # JPEG near LR scale
    assert mean_strength("lr_jpeg_rms", **jpeg, jpeg_quality=[15, 15]) > \
        mean_strength("lr_jpeg_rms", **jpeg, jpeg_quality=[90, 90])


def test_lr_measure_labels_by_the_lr_edges():
    cfg = lr_measured(DegradationConfig())
    _, p = degrade(HR, (32, 32), cfg, seed=3)
    s = p["strength"]
    low = LabelThresholds(measure="lr", lr_blur_rms=[s["lr_blur_rms"] + 1] * 3,
                          lr_noise_rms=[s["lr_noise_rms"] + 1] * 3, lr_jpeg_rms=[s["lr_jpeg_rms"] + 1] * 3)
    high = LabelThresholds(measure="lr", lr_blur_rms=[-3, -2, -1], lr_noise_rms=[-3, -2, -1], lr_jpeg_rms=[-3, -2, -1])
    assert [label_degradation(p, low)[i] for i in (0, 2, 3)] == ["none"] * 3
    assert [label_degradation(p, high)[i] for i in (0, 2, 3)] == ["heavy"] * 3
    # the synthesis words ignore the LR edges
    assert label_degradation(p, LabelThresholds()) == label_degradation(p, LabelThresholds(lr_noise_rms=[-3, -2, -1]))
    _, synthesis_only = degrade(HR, (32, 32), DegradationConfig(), seed=3)
    with pytest.raises(ValueError, match="no LR strengths"):
        label_degradation(synthesis_only, low)


@pytest.mark.parametrize("value,word", [(0.0, "none"), (1.19, "none"), (1.2, "light"), (2.49, "light"),
                                        (2.5, "medium"), (4.5, "heavy"), (99.0, "heavy")])
def test_blur_edges(value, word):
    assert level_increasing(value, [1.2, 2.5, 4.5]) == word


@pytest.mark.parametrize("q,word", [(100, "none"), (80.01, "none"), (80, "light"), (60.5, "light"),
                                    (60, "medium"), (40.5, "medium"), (40, "heavy"), (5, "heavy")])
def test_jpeg_edges(q, word):
    assert level_decreasing(q, [80, 60, 40]) == word


@pytest.mark.parametrize("s,word", [(0.94, "downsample"), (0.95, "keep"), (1.0, "keep"), (1.05, "keep"), (1.0501, "upsample")])
def test_resize_edges(s, word):
    assert resize_word(s, 0.05) == word


def test_labeller_uses_configured_thresholds():
    _, p = degrade(HR, (32, 32), DegradationConfig(), seed=3)
    s = p["strength"]["noise_std"]
    below = LabelThresholds(noise_std=[s + 1, s + 2, s + 3])
    above = LabelThresholds(noise_std=[s / 4, s / 3, s / 2])
    assert label_degradation(p, below)[2] == "none"
    assert label_degradation(p, above)[2] == "heavy"


def test_kernels():
    for k in (gaussian_kernel(21, 2.0, 1.0, 0.3), generalized_gaussian_kernel(15, 1.5, 2.5, 1.0, 0.7),
              plateau_kernel(11, 1.0, 1.0, 0.0, 1.5), sinc_kernel(13, np.pi / 4)):
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert abs(k.sum() - 1.0) < 1e-9
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-12)  # point-symmetric
    assert abs(kernel_std(gaussian_kernel(41, 3.0, 3.0, 0.0)) - 3.0) < 0.01
    aniso = gaussian_kernel(41, 4.0, 1.0, 0.0)
    assert aniso[20, 20 + 6] > aniso[20 + 6, 20]  # wider along x than along y
    assert kernel_std(np.pad(np.ones((1, 1)), 3)) == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        degrade(HR.astype(np.float32), (32, 32), DegradationConfig(), 0)


def test_betag_split_draws_below_one_half_of_the_time():
    from vlcot.config import BlurConfig
    from vlcot.kernels import random_kernel

    def below_one(split):
        cfg = BlurConfig(kernel_types=["generalized_iso"], kernel_probs=[1.0], sinc_prob=0.0, betag_split=split)
        rng = np.random.default_rng(0)
        betas = [random_kernel(rng, cfg)[1]["beta"] for _ in range(2000)]
        assert all(0.5 <= b <= 4.0 for b in betas)
        return np.mean([b < 1.0 for b in betas])

    assert abs(below_one(True) - 0.5) < 0.04  # Real-ESRGAN's draw
    assert abs(below_one(False) - 0.5 / 3.5) < 0.03  # uniform over [0.5, 4]


def test_usm_sharpening_adds_edge_contrast_only_where_there_is_detail():
    from vlcot.degradation import usm_sharpen

    flat = np.full((64, 64, 3), 120, np.uint8)
    assert np.array_equal(usm_sharpen(flat), flat)  # no detail above the threshold: unchanged
    sharp = usm_sharpen(HR)
    lap = lambda a: np.var(np.diff(a.astype(float), 2, axis=0)) + np.var(np.diff(a.astype(float), 2, axis=1))  # noqa: E731
    assert sharp.shape == HR.shape and sharp.dtype == np.uint8
    assert lap(sharp) > 1.2 * lap(HR)
    assert np.abs(sharp.astype(int) - HR.astype(int)).mean() < 12  # a sharpening, not a new image
