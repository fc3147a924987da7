"""bench/gpu_smoke.py stays runnable: its --cpu mode (the same stages at a tiny shape) run as a
subprocess with this interpreter, its JSON checked against values written from the paper's
layout and the shapes, not read back from the script; plus its GPU shape built on the meta
device (a real Chameleon-7B parameter count) and its host-read counter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_smoke.py"


def _run(tmp: Path, *args: str):
    out = tmp / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    proc, res = _run(tmp_path_factory.mktemp("smoke"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, res


def test_every_stage_ran_and_passed(smoke):
    stdout, res = smoke
    assert res["mode"] == "cpu" and res["failed"] == []
    assert list(res["stages"]) == ["build", "decode", "learner", "vq"]
    assert all(r["ok"] and r["seconds"] > 0 for r in res["stages"].values())
    for name in res["stages"]:
        assert f"  {name}" in stdout  # one printed line per stage
    # the script must run where omegaconf, Ray, DeepSpeed and vLLM are absent: it never imports them
    assert res["absent_on_gpu_imported"] == []


def test_build_is_the_tiny_chameleon_in_bf16(smoke):
    b = smoke[1]["stages"]["build"]
    h, i, v, layers = 64, 176, 73728, 2
    # embed + lm_head; per layer q k v o, gate up down, 2 norms, q/k norm weight + bias [heads, head_dim]; final norm
    assert b["trainable_params"] == 2 * v * h + layers * (4 * h * h + 3 * h * i + 2 * h + 4 * h) + h
    assert b["dtype"] == "bfloat16" and b["device"] == "cpu"


def test_decode_draws_one_whole_guided_image(smoke):
    d = smoke[1]["stages"]["decode"]
    side = 128 // 8  # --cpu draws the final image of a 128-px HR: 16 x 16 codes
    span = side * (side + 1) + 4  # start, two grid tokens, rows each ended by a newline, end
    assert d["image_span_tokens"] == d["expected_span_tokens"] == span == 276
    assert d["generated_tokens"] == span - 1  # the prompt ends in image_start
    assert d["codes_shape"] == [side, side]
    assert d["cfg_twins"] == 1 and d["cfg_unguided_codes"] == 0  # the unconditional branch ran for the image
    assert d["tokens_per_s"] > 0 and d["steps"] == span - 1
    # the HF engine feeds each drawn token to the span state machine on the host: at least one read per step
    assert d["host_reads_per_step"] >= 1.0 and sum(d["host_reads_by_method"].values()) >= d["steps"]


def test_learner_step_has_a_finite_loss_and_gradients_everywhere(smoke):
    r = smoke[1]["stages"]["learner"]
    assert r["trace_tokens"] == 512 and r["gradient_checkpointing"]
    assert r["chunks"] == math.ceil(r["scored_positions"] / r["chunk"]) > 1
    assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert r["params_with_grad"] == 3 + 13 * 2  # embed, lm_head, final norm + 13 tensors per layer
    assert 0 < r["entropy_mean"] <= math.log(73728) + 1e-3
    assert r["peak_memory_gb"] > 0 and r["peak_memory_source"]
    assert r["estimate_gb"]["total"] > r["estimate_gb"]["weights_bf16"] > 0


def test_vq_decodes_the_drawn_image(smoke):
    q = smoke[1]["stages"]["vq"]
    assert q["decoded_shape"] == [2, 3, 128, 128] and q["drawn_image_shape"] == [1, 3, 128, 128]
    assert q["drawn_image_finite"] and -1.0 <= q["pixel_range"][0] <= q["pixel_range"][1] <= 1.0
    assert q["images_per_s"] > 0


def test_a_failed_stage_is_named_and_exits_nonzero(tmp_path):
    proc, res = _run(tmp_path, "--stages", "build,learner", "--trace-tokens", "100")
    assert proc.returncode == 1
    assert "learner" in proc.stderr and "FAILED" in proc.stdout
    assert res["stages"]["build"]["ok"] and not res["stages"]["learner"]["ok"]
    assert "cannot hold" in res["stages"]["learner"]["error"]


def test_gpu_shape_is_chameleon_7b():
    from bench._smoke import GPU, build_policy, memory_estimate, released_layout

    layout = released_layout()
    assert layout.image_start == 8197 and layout.image_end == 8196 and layout.row_newline == 8803
    assert layout.code_ids[0] == 4 and layout.code_ids[8191] == 8195 and layout.code_ids[8192] == 65536
    assert layout.code_ids[-1] == 73727
    model = build_policy(GPU, layout, torch.device("meta"))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 7.0e9 < n < 7.1e9 and next(model.parameters()).dtype == torch.bfloat16
    est = memory_estimate(GPU, n, n, 5700)
    # configs/pure-7b.yaml: 32 layers x 10k x 4096 x 2 B = 2.6 GB of checkpointed hidden states
    assert est["checkpointed_hidden"] == pytest.approx(2.6e9, rel=0.02)
    assert est["weights_bf16"] == est["grads_bf16"] == pytest.approx(14.16e9, rel=0.01)


def test_sync_counter_counts_host_reads_and_restores_tensor():
    from bench._smoke import SyncCounter

    before = {m: torch.Tensor.__dict__.get(m) for m in SyncCounter.METHODS}
    t = torch.arange(3.0)
    with SyncCounter(cuda_only=False) as c:
        t.tolist(), float(t[0]), int(t[1]), bool(t[2])
        c.depth = 1
        t[0].item()
    assert c.rules == 4 and c.model == 1
    assert c.by_method == {"tolist": 1, "__float__": 1, "__int__": 1, "__bool__": 1, "item": 1}
    assert {m: torch.Tensor.__dict__.get(m) for m in SyncCounter.METHODS} == before
    with SyncCounter(cuda_only=True) as c:  # CPU tensors never sync
        t.tolist()
    assert c.rules == c.model == 0
