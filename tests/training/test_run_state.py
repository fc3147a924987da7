"""The driver's checkpoint state and data cursor, without actors."""

import json

import numpy as np

from training.run_state import CKPT_DIR, DRIVER_STATE, DataCursor, DriverState, latest_checkpoint, prune_checkpoints


def test_driver_state_round_trip_and_an_older_checkpoint(tmp_path):
    cursor = DataCursor(5, seed=3)
    first = cursor.take(7)  # into the second epoch
    state = DriverState(4, 4, cursor.state(), "run123", [1.0, 2.0], {"format": [0.5, 0.75]}, {"lr": 1e-4})
    ckpt = tmp_path / CKPT_DIR / "step_000004"
    ckpt.mkdir(parents=True)
    state.write(ckpt)
    back = DriverState.read(ckpt)
    assert back == state and latest_checkpoint(str(tmp_path)) == ckpt
    resumed = DataCursor(5, seed=99)  # the seed no longer matters: the saved RNG state does
    resumed.restore(back.cursor)
    assert resumed.take(6) == cursor.take(6) and len(set(first[:5])) == 5
    # a checkpoint from before the histories and the schedule were saved
    (ckpt / DRIVER_STATE).write_text(json.dumps({"step": 2, "version": 2, "cursor": cursor.state()}))
    old = DriverState.read(ckpt)
    assert (old.reward_history, old.component_history, old.lr_schedule, old.mlflow_run_id) == ([], {}, None, None)


def test_prune_keeps_the_newest_and_an_unfinished_checkpoint_is_not_latest(tmp_path):
    for step in (1, 2, 3):
        d = tmp_path / CKPT_DIR / f"step_{step:06d}"
        d.mkdir(parents=True)
        DriverState(step, step, {}, None).write(d)
    (tmp_path / CKPT_DIR / "step_000004").mkdir()  # killed while saving: no driver state yet
    assert latest_checkpoint(str(tmp_path)).name == "step_000003"
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / CKPT_DIR).iterdir()) == ["step_000003", "step_000004"]


def test_spread_order_puts_every_source_once_in_each_run_and_resumes_exactly():
    sources = [f"img{i % 5}" for i in range(20)] + ["img5"] * 2  # 5 sources x 4 records, one source with 2
    cursor = DataCursor(len(sources), seed=1, sources=sources)
    first = cursor.take(6)
    assert len({sources[i] for i in first}) == 6  # six prompts, six different photographs
    epoch = first + cursor.take(len(sources) - 6)
    assert sorted(epoch) == list(range(len(sources)))  # an epoch is still every record once
    for r in range(2):  # the rounds while every source has records left: each source once
        assert sorted(sources[i] for i in epoch[6 * r: 6 * r + 6]) == [f"img{i}" for i in range(6)]
    saved = cursor.state()
    again = DataCursor(len(sources), seed=7, sources=sources)
    again.restore(saved)
    assert again.take(30) == cursor.take(30)
    plain = DataCursor(len(sources), seed=1)  # shuffle: the same draws it always made
    assert [int(i) for i in np.random.default_rng(1).permutation(len(sources))][:6] == plain.take(6)
