"""The 7B configs' KV arithmetic: they validate, their headers state what config validation
computes (rollout/kv_budget.py via cluster.config.rollout_kv_estimate), and validation warns
exactly where a rollout worker's peak does not fit."""

import re
import warnings

import pytest

from cluster.config import CONFIG_DIR, KVBudgetWarning, load_config, rollout_kv_estimate
from tests.cluster.test_config import stand_in_files

HEADER = re.compile(r"KV peak per worker: ([\d.]+)k tokens \(capacity ([\d.]+)k\)")


def load(name, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(CONFIG_DIR / name, stand_in_files(tmp_path))
    return cfg, [w for w in caught if issubclass(w.category, KVBudgetWarning)]


@pytest.mark.parametrize("name,twins,fits", [("pure-7b.yaml", False, True), ("pure-7b-published.yaml", True, False)])
def test_7b_headers_state_the_validated_kv_peak_and_the_warning_follows_it(tmp_path, name, twins, fits):
    cfg, warned = load(name, tmp_path)
    est, shape, _ = rollout_kv_estimate(cfg)
    stated = HEADER.findall((CONFIG_DIR / name).read_text())
    assert len(stated) == 1, f"{name} must state its KV peak once"
    demand_k, capacity_k = (float(x) for x in stated[0])
    assert demand_k == round(est.demand / 1000, 1) and capacity_k == round(est.capacity / 1000, 1)
    assert shape.bytes_per_token == 512 * 1024 and (est.trace.twin == 4164) == twins
    assert est.fits == fits and len(warned) == (0 if fits else 1)
    if warned:
        msg = str(warned[0].message)
        assert f"{est.demand:,} tokens" in msg and f"{est.capacity:,}" in msg and "80 GiB" in msg
        assert "twin 4,164" in msg and "gpu_memory_utilization 0.85" in msg


def test_more_kv_room_or_more_workers_silence_the_warning(tmp_path):
    """The settings the warning names do fit the published run: 0.9 of the card, or 6 workers."""
    for i, extra in enumerate((["rollout.gpu_memory_utilization=0.9"], ["rollout.num_workers=6"])):
        (tmp_path / str(i)).mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("error", KVBudgetWarning)
            cfg = load_config(CONFIG_DIR / "pure-7b-published.yaml", stand_in_files(tmp_path / str(i)) + extra)
        assert rollout_kv_estimate(cfg)[0].fits


def test_a_policy_config_json_with_sizes_is_used_and_a_forced_cpu_cache_is_counted_in_blocks(tmp_path):
    cfg, _ = load("pure-7b.yaml", tmp_path)
    (tmp_path / "policy" / "config.json").write_text(
        '{"architectures": ["ChameleonForConditionalGeneration"], "max_position_embeddings": 11776, '
        '"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32}')
    (tmp_path / "b").mkdir()
    cfg = load_config(CONFIG_DIR / "pure-7b.yaml",
                      stand_in_files(tmp_path / "b") + [f"policy.checkpoint={tmp_path / 'policy'}"])
    est, shape, _ = rollout_kv_estimate(cfg)
    assert shape.kv_heads == 8 and shape.bytes_per_token == 2 * 32 * 8 * 128 * 2 and "config.json" in shape.source
    cpu = load_config(overrides=["rollout.kv_cache_blocks=3"])
    est, _, note = rollout_kv_estimate(cpu)
    assert est.capacity == 3 * 128 and "kv_cache_blocks 3" in note and not est.fits
    assert rollout_kv_estimate(load_config(overrides=["rollout.engine=hf"])) is None
