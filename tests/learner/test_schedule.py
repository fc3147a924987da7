"""Learning-rate schedules: the rate of every step is the formula's, and bad settings are
config errors naming the key."""

import math

import pytest

from cluster.config import ConfigError, load_config
from learner.schedule import LRPhase, ScheduleConfig, lr_at


def test_each_schedule_follows_its_formula_step_by_step():
    n, lr = 5, 1e-3
    for name, expect in (("constant", lambda p: 1.0),
                         ("linear", lambda p: 1.0 - 0.9 * p),
                         ("cosine", lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))):
        cfg = ScheduleConfig(name=name, final_ratio=0.1)
        got = [lr_at(s, cfg, n, lr) for s in range(1, n + 1)]
        assert got == pytest.approx([lr * expect((s - 1) / (n - 1)) for s in range(1, n + 1)]), name
    # linear: first step at lr, last at final_ratio x lr, and past the end it stays there
    lin = ScheduleConfig(name="linear", final_ratio=0.1)
    assert lr_at(1, lin, n, lr) == pytest.approx(lr) and lr_at(5, lin, n, lr) == pytest.approx(1e-4)
    assert lr_at(9, lin, n, lr) == pytest.approx(1e-4)


def test_warmup_ramps_the_first_steps():
    cfg = ScheduleConfig(name="constant", warmup_steps=3)
    assert [lr_at(s, cfg, 10, 1.0) for s in range(1, 6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_phases_each_start_at_their_own_rate_and_decay_over_their_own_steps():
    cfg = ScheduleConfig(name="linear", phases=[LRPhase(3, 5e-6), LRPhase(5, 2e-6)])
    got = [lr_at(s, cfg, 8, 123.0) for s in range(1, 9)]  # learner.lr is not used when phases are given
    assert got == pytest.approx([5e-6, 2.5e-6, 0.0, 2e-6, 1.5e-6, 1e-6, 0.5e-6, 0.0])


@pytest.mark.parametrize("overrides,key", [
    (["learner.schedule.warmup_steps=100", "trainer.steps=100"], "learner.schedule.warmup_steps"),  # longer than the run
    (["learner.schedule.name=step"], "learner.schedule.name"),
    (["learner.schedule.final_ratio=1.5"], "learner.schedule.final_ratio"),
    (["learner.schedule.phases=[{steps: 3, lr: 5e-6}]", "trainer.steps=10"], "learner.schedule.phases"),
    (["rollout.sampling.cfg_scale=-0.5", "rollout.engine=hf"], "rollout.sampling.cfg_scale"),  # a negative scale
    (["rollout.sampling.cfg_scale=-0.5"], "rollout.sampling.cfg_scale"),  # ... on the vLLM engine too
])
def test_bad_schedules_and_guidance_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_phases_from_an_override_validate():
    cfg = load_config(overrides=["learner.schedule.phases=[{steps: 3, lr: 5e-6}, {steps: 7, lr: 2e-6}]",
                                 "trainer.steps=10", "learner.schedule.name=linear"])
    assert [p.steps for p in cfg.learner.schedule.phases] == [3, 7]
    assert lr_at(4, cfg.learner.schedule, 10, cfg.learner.lr) == pytest.approx(2e-6)
