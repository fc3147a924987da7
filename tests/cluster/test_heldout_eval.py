"""The held-out report's table and line, without actors (the driver tests run it for real)."""

from cluster.heldout_eval import HeldOutScore, render, summary_line


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
    from cluster.heldout_eval import heldout_for

    for k, how in ((0, "prepare-data writes it with data.heldout_per_image > 0"),
                   (1, "the data was prepared without it: run `realsr-r1 prepare-data` again")):
        cfg = load_config(overrides=[f"data.output_dir={tmp_path}", f"data.heldout_per_image={k}"])
        assert heldout_for(cfg, tmp_path, None, None, None) is None
        assert f"held-out eval: none ({tmp_path / 'heldout.jsonl'} does not exist; {how}" in capsys.readouterr().out
    assert heldout_for(load_config(overrides=["trainer.heldout_eval=false"]), tmp_path, None, None, None) is None
    assert capsys.readouterr().out == ""
