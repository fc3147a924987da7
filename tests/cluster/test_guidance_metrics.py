"""`rollout/cfg_twins` and `rollout/cfg_unguided_codes` per step: the rollout pool's counter turns
the workers' cumulative counters into one step's counts and warns naming the setting that helps."""

import logging
import pytest

from cluster.guidance import GuidanceCounter, guidance_metrics


def counters(twins, unguided):
    return {"cfg_twins": float(twins), "cfg_unguided_codes": float(unguided), "tokens": 1.0}


def test_a_steps_counts_are_the_counters_since_the_last_collect_and_a_replaced_worker_counts_from_zero():
    assert guidance_metrics([], [counters(3, 0), counters(2, 1)]) == {"rollout/cfg_twins": 5.0,
                                                                      "rollout/cfg_unguided_codes": 1.0}
    before = [counters(3, 1), counters(2, 0)]
    now = [counters(5, 1), counters(1, 0), counters(4, 2)]  # slot 1 replaced (its counters restarted), slot 2 new
    assert guidance_metrics(before, now) == {"rollout/cfg_twins": 2 + 1 + 4.0, "rollout/cfg_unguided_codes": 2.0}


@pytest.mark.parametrize("gpus,hint", [(0, "rollout.kv_cache_gb"), (1, "rollout.gpu_memory_utilization")])
def test_each_collect_is_reported_with_a_warning_naming_the_setting_for_its_hardware(caplog, gpus, hint):
    counter = GuidanceCounter(on_gpu=gpus > 0)
    reads = iter([[counters(4, 0), counters(4, 0)], [counters(8, 0), counters(8, 5)]])
    with caplog.at_level(logging.WARNING, logger="cluster.guidance"):
        assert counter.since_last(lambda: next(reads)) == {"rollout/cfg_twins": 8.0, "rollout/cfg_unguided_codes": 0.0}
        assert not caplog.records
        assert counter.since_last(lambda: next(reads)) == {"rollout/cfg_twins": 8.0, "rollout/cfg_unguided_codes": 5.0}
    assert len(caplog.records) == 1 and "5 image codes" in caplog.text and hint in caplog.text
    other = "rollout.gpu_memory_utilization" if gpus == 0 else "rollout.kv_cache_gb"
    assert other not in caplog.text


def test_unreadable_counters_are_a_warning_not_a_failed_step(caplog):
    def gone():
        raise RuntimeError("worker died")

    with caplog.at_level(logging.WARNING, logger="cluster.guidance"):
        assert GuidanceCounter(on_gpu=False).since_last(gone) == {}
    assert "worker died" in caplog.text
