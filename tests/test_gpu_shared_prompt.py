"""bench/gpu_shared_prompt.py stays runnable and honest: its --cpu mode (tiny shape, fp32) run as
a subprocess with this interpreter; the shared pass's log-probs and gradient norm equal the
separate passes' in both attention layouts, and the tokens it reports are the arithmetic of one prompt read once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_mode_reports_equal_passes_and_the_prompt_read_once(tmp_path):
    out = tmp_path / "shared.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_shared_prompt.py"), "--cpu", "--groups", "3",
                           "--trace-tokens", "600", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dtype"] == "float32" and res["trace_tokens"] == 600
    g = res["groups"]["3"]
    p = g["prompt_tokens"]
    assert 0 < p < 600
    assert g["separate"]["tokens"] == 3 * 600 and g["separate"]["grad_norm"] > 0 and g["separate"]["seconds"] > 0
    for layout in ("rows", "response_queries"):  # both attention layouts of the pack
        shared = g[layout]
        assert shared["tokens"] == p + 3 * (600 - p)
        assert shared["logp_max_abs_diff"] < 1e-5 and shared["grad_norm_rel_diff"] < 1e-5
        assert shared["seconds"] > 0


def test_a_pass_that_fails_is_recorded_and_the_others_still_run():
    """On a lent GPU the run is one command: a pass that fails (a kernel the GPU lacks, out of
    memory) is recorded with its error and traceback, and does not take the other passes' numbers."""
    import torch

    from bench.gpu_shared_prompt import _attempt, _line

    def broken():
        raise RuntimeError("no kernel for lower-right causal")

    rec = _attempt(torch.device("cpu"), broken)
    assert rec["error"] == "RuntimeError: no kernel for lower-right causal"
    assert any("broken" in line for line in rec["traceback"])
    assert _line("shared (response_queries)", rec) == "shared (response_queries): " + rec["error"]
    ok = _attempt(torch.device("cpu"), lambda: {"tokens": 10})
    assert ok["tokens"] == 10 and ok["seconds"] >= 0 and "error" not in ok
