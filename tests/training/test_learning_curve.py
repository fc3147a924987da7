"""The end-of-run verdict statistic and the reward plot."""

import math

import numpy as np
import pytest
from PIL import Image

from training.learning_curve import learning_report, moving_average, report_learning, rise_verdict


def test_rise_and_its_standard_error_follow_the_formula():
    v = [1.0, 2.0, 0.0, 5.0, 5.0, 3.0, 7.0, 4.0]  # quarters of 2: [1, 2] and [7, 4]
    r = rise_verdict(v)
    assert r.quarter == 2 and r.first_mean == 1.5 and r.last_mean == 5.5 and r.rise == 4.0
    assert r.se == pytest.approx(math.sqrt(0.5 / 2 + 4.5 / 2))
    assert r.z == pytest.approx(4.0 / r.se)
    assert r.ci_low <= r.rise <= r.ci_high


def test_a_real_rise_is_learning_and_noise_is_not():
    rng = np.random.default_rng(0)
    rising = np.linspace(2.4, 3.0, 40) + rng.normal(0, 0.08, 40)
    flat = 2.5 + rng.normal(0, 0.15, 40)
    up, none = rise_verdict(rising), rise_verdict(flat)
    assert up.learned and up.ci_low > 0 and up.line().startswith("verdict: learned")
    assert not none.learned and "no clear rise" in none.line()
    assert none.ci_low < 0 < none.ci_high


def test_too_few_steps_is_said_not_guessed():
    r = rise_verdict([1.0, 2.0, 3.0])
    assert math.isnan(r.se) and not r.learned and r.line().startswith("verdict: too few steps")
    with pytest.raises(ValueError):
        rise_verdict([])


def test_moving_average_is_trailing():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])


def test_report_writes_a_plot_with_a_panel_per_component(tmp_path):
    total = list(np.linspace(2, 3, 12))
    comps = {"format": [1.0] * 12, "degradation": list(np.linspace(0.5, 0.9, 12))}
    rep = learning_report(total, comps, tmp_path)
    img = Image.open(rep["plot"])
    assert img.format == "PNG" and img.size[0] > 300
    (tmp_path / "two").mkdir()
    fewer = Image.open(learning_report(total, {"format": [1.0] * 12}, tmp_path / "two")["plot"])
    assert img.size[1] > fewer.size[1]  # three panels are taller than two
    assert rep["learned"] and rep["steps"] == 12 and rep["line"].startswith("verdict: learned")


def test_end_of_run_report_logs_the_plot_and_never_raises(tmp_path, capsys):
    logged = []

    class Tracker:
        def artifact(self, path):
            logged.append(path)

    total = list(np.linspace(2, 3, 12))
    rep = report_learning(total, {"format": [1.0] * 12}, tmp_path, Tracker())
    assert logged == [rep["plot"]] and capsys.readouterr().out.strip() == rep["line"]
    assert report_learning([], {}, tmp_path, Tracker()) is None  # no step ran
    missing = tmp_path / "no" / "such" / "folder"  # the plot cannot be saved: said, not raised
    failed = report_learning(total, {"format": [1.0] * 12}, missing, Tracker())
    assert set(failed) == {"error"} and "FileNotFoundError" in failed["error"] and len(logged) == 1


@pytest.mark.parametrize("z, word", [(1.9, "no clear rise"), (2.1, "weak rise"), (2.95, "weak rise"),
                                     (3.05, "learned"), (8.0, "learned")])
def test_the_verdict_words_change_at_2_and_3_standard_errors(z, word):
    """Quarters [0, 1] and [s, s + 1] (8 steps): se = sqrt(0.5 / 2 + 0.5 / 2) exactly, rise = s,
    so s picks z; the words must switch at 2 (weak) and 3 (learned) standard errors."""
    s = z * math.sqrt(0.5)
    r = rise_verdict([0.0, 1.0, 5.0, 5.0, 5.0, 5.0, s, s + 1.0])
    assert r.z == pytest.approx(z)
    assert r.line().startswith(f"verdict: {word}:") and r.learned == (word == "learned")
