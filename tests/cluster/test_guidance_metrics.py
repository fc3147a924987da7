"""`rollout/cfg_twins` and `rollout/cfg_unguided_codes` per step: the driver turns the rollout
workers' cumulative counters into one step's counts and warns naming the setting that helps."""

import logging
from types import SimpleNamespace

import pytest

from cluster.config import load_config
from cluster.driver import GRPOTrainer
from cluster.metrics import guidance_metrics


def counters(twins, unguided):
    return {"cfg_twins": float(twins), "cfg_unguided_codes": float(unguided), "tokens": 1.0}


def test_a_steps_counts_are_the_counters_since_the_last_collect_and_a_replaced_worker_counts_from_zero():
    assert guidance_metrics([], [counters(3, 0), counters(2, 1)]) == {"rollout/cfg_twins": 5.0,
                                                                      "rollout/cfg_unguided_codes": 1.0}
    before = [counters(3, 1), counters(2, 0)]
    now = [counters(5, 1), counters(1, 0), counters(4, 2)]  # slot 1 replaced (its counters restarted), slot 2 new
    assert guidance_metrics(before, now) == {"rollout/cfg_twins": 2 + 1 + 4.0, "rollout/cfg_unguided_codes": 2.0}


@pytest.mark.parametrize("gpus,hint", [(0, "rollout.kv_cache_gb"), (1, "rollout.gpu_memory_utilization")])
def test_the_driver_reports_each_collect_and_warns_with_the_setting_for_its_hardware(tmp_path, caplog, gpus, hint):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"rollout.gpus_per_worker={gpus}"])
    trainer = GRPOTrainer(cfg, progress=False)
    reads = iter([[counters(4, 0), counters(4, 0)], [counters(8, 0), counters(8, 5)]])
    trainer.rollout = SimpleNamespace(throughput=lambda: next(reads))
    with caplog.at_level(logging.WARNING, logger="cluster.driver"):
        assert trainer._guidance_counts() == {"rollout/cfg_twins": 8.0, "rollout/cfg_unguided_codes": 0.0}
        assert not caplog.records
        assert trainer._guidance_counts() == {"rollout/cfg_twins": 8.0, "rollout/cfg_unguided_codes": 5.0}
    assert len(caplog.records) == 1 and "5 image codes" in caplog.text and hint in caplog.text
    other = "rollout.gpu_memory_utilization" if gpus == 0 else "rollout.kv_cache_gb"
    assert other not in caplog.text


def test_unreadable_counters_are_a_warning_not_a_failed_step(tmp_path, caplog):
    trainer = GRPOTrainer(load_config(None, [f"run_dir={tmp_path}"]), progress=False)

    def gone():
        raise RuntimeError("worker died")

    trainer.rollout = SimpleNamespace(throughput=gone)
    with caplog.at_level(logging.WARNING, logger="cluster.driver"):
        assert trainer._guidance_counts() == {}
    assert "worker died" in caplog.text
