"""The held-out report's table and line, without actors (the driver tests run it for real)."""

import json
from dataclasses import asdict

import pytest

from training.heldout_eval import DegradationWords, HeldOutScore, majority_accuracy, render, score_from, summary_line


def test_side_by_side_table_and_line():
    start = HeldOutScore("SFT", 0, 20, 2, {"format": 0.5, "degradation": 0.4, "total": 0.9})
    end = HeldOutScore("GRPO", 24, 22, 0, {"format": 0.75, "degradation": 0.5, "total": 1.25})
    report = {"manifest": "data/heldout.jsonl", "prompts": 22, "start": vars(start), "end": vars(end)}
    md = render(report)
    assert "| reward | SFT (v0) | GRPO (v24) | change |" in md
    assert "| degradation | 0.400 | 0.500 | +0.100 |" in md and "| total | 0.900 | 1.250 | +0.350 |" in md
    assert "SFT: 2 prompts refused" in md and "GRPO: " not in md
    line = summary_line(start, end, 22)
    assert line.startswith("held-out (22 prompts, greedy) SFT -> GRPO: format 0.500 -> 0.750")


def test_a_resumed_run_without_a_start_column_says_so():
    end = HeldOutScore("GRPO", 5, 3, 0, {"format": 1.0, "total": 1.0})
    md = render({"manifest": "h.jsonl", "prompts": 3, "start": None, "end": vars(end)})
    assert "| reward | GRPO (v5) |" in md and "change" not in md and "was not measured" in md
    assert summary_line(None, end, 3) == "held-out (3 prompts, greedy) GRPO: format 1.000, total 1.000"


def test_no_heldout_file_says_how_to_make_one(tmp_path, capsys):
    from cluster.config import load_config
    from training.heldout_eval import heldout_for

    for k, how in ((0, "prepare-data writes it with data.heldout_per_image > 0"),
                   (1, "the data was prepared without it: run `realsr-r1 prepare-data` again")):
        cfg = load_config(overrides=[f"data.output_dir={tmp_path}", f"data.heldout_per_image={k}"])
        assert heldout_for(cfg, tmp_path, None, None, None) is None
        assert f"held-out eval: none ({tmp_path / 'heldout.jsonl'} does not exist; {how}" in capsys.readouterr().out
    assert heldout_for(load_config(overrides=["trainer.heldout_eval=false"]), tmp_path, None, None, None) is None
    assert capsys.readouterr().out == ""


def test_degradation_words_and_the_majority_baseline_by_hand():
    labels = [["light", "keep", "none", "heavy", "downsample"],
              ["heavy", "keep", "none", "light", "downsample"],
              ["light", "upsample", "heavy", "light", "downsample"]]
    said = [["light", "keep", "none", "light", "downsample"],
            ["light", "keep", "none", "light", "downsample"],
            ["light", None, "none", "light", "downsample"]]
    w = DegradationWords.of(said, labels)
    assert w.accuracy == {"blur": 2 / 3, "resize": 2 / 3, "noise": 2 / 3, "compression": 2 / 3, "final_resize": 1.0}
    assert (w.distinct, w.commonest, w.commonest_count) == (2, "light keep none light downsample", 2)
    training = [["heavy", "keep", "none", "light", "keep"]] * 2 + [["light", "upsample", "heavy", "heavy", "keep"]]
    assert majority_accuracy(training, labels) == {"blur": 1 / 3, "resize": 2 / 3, "noise": 2 / 3,
                                                   "compression": 2 / 3, "final_resize": 0.0}
    with pytest.raises(ValueError, match="2 answers for 3"):
        DegradationWords.of(said[:2], labels)


def test_the_report_names_a_policy_that_writes_one_answer_for_every_prompt():
    one = DegradationWords({"blur": 0.2, "resize": 0.9, "noise": 0.3, "compression": 0.2, "final_resize": 1.0},
                           1, "medium downsample medium light downsample", 30)
    two = DegradationWords({"blur": 0.4, "resize": 0.9, "noise": 0.3, "compression": 0.3, "final_resize": 1.0},
                           7, "medium downsample medium light downsample", 12)
    start = HeldOutScore("SFT", 0, 30, 0, {"degradation": 0.52, "total": 0.52}, [0], one)
    end = HeldOutScore("GRPO", 40, 30, 0, {"degradation": 0.58, "total": 0.58}, [40], two)
    majority = {"blur": 0.2, "resize": 0.9, "noise": 0.3, "compression": 0.2, "final_resize": 1.0}
    report = json.loads(json.dumps({"manifest": "h.jsonl", "prompts": 30, "start": asdict(start),
                                    "end": asdict(end), "majority_words": majority}))
    assert score_from(report["end"]) == end  # the words survive the JSON report (a resumed run reads it back)
    md = render(report)
    assert "| slot | SFT (v0) | GRPO (v40) | majority word |" in md
    assert "| blur | 0.200 | 0.400 | 0.200 |" in md and "| mean of five | 0.520 | 0.580 | 0.520 |" in md
    assert "| different answers | 1 | 7 | 1 |" in md
    assert 'SFT wrote the same degradation words for all 30 prompts ("medium downsample medium light downsample")' in md
    assert "GRPO wrote the same" not in md
    assert summary_line(start, end, 30).endswith("different degradation answers 1 -> 7")
