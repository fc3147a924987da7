"""The GRPO driver end to end on a real local CPU Ray: learner ranks, a vLLM rollout worker,
a reward worker in the IQA environment, MLflow in a sqlite store."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import ray
import torch

from app.cli import main as cli_main
from cluster.config import load_config
from training.driver import GRPOTrainer, latest_checkpoint
from training.heldout_eval import majority_accuracy
from training.run_state import DriverState
from training.step_metrics import reward_metric_names
from learner.schedule import lr_at
from vlcot.manifest import read_manifest
from vlcot.trace import SLOTS

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def ray_down_after():
    """The trainer starts a private Ray when none is running; leave none behind, even on failure."""
    yield
    ray.shutdown()

REQUIRED = [
    "adv/zero_std_fraction", "kl", "entropy", "clip_fraction", "grad_norm", "lr", "tokens/text", "tokens/image",
    "timing/generate_s", "timing/reward_s", "timing/learn_s", "timing/sync_s", "rollout/tokens_per_s",
    "sync/seconds", "sync/gb_per_s", "policy/version_lag", "samples/count", "rollout/cfg_twins",
    "rollout/cfg_unguided_codes", "trace/response_tokens", "trace/text_tokens", "trace/final_image_tokens",
    "trace/all_images_fraction",
]


def small(tmp_path, *extra):
    return load_config(overrides=[
        f"run_dir={tmp_path}", f"data.output_dir={tmp_path / 'data'}", "trainer.steps=2", "trainer.prompts_per_step=2",
        "rollout.group_size=2", "trainer.sft=false", "trainer.log_images_every=1", "learner.lr=1e-4",
        "rollout.sampling.text_budget=64", *extra])


def run_metrics(summary):
    client = mlflow.tracking.MlflowClient(summary["mlflow_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    return client, run


PLUGIN = """
def text_length(batch):
    return [(min(1.0, s.parsed.num_text_tokens / 100), {"text_tokens": s.parsed.num_text_tokens}) for s in batch]
"""


@pytest.mark.parametrize("mode,placement", [("sync", "enabled"), ("async", "disabled")])
def test_two_step_run_logs_every_metric(tmp_path, mode, placement, monkeypatch, capsys):
    """Every metric, including a user's reward loaded from a file path into the reward workers,
    weighted into the total and logged as its own metric, in the run's own store (MLflow
    exports the URI to the environment; a run must not leave it there for the next run)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "my_reward.py").write_text(PLUGIN)
    heldout = 1 if mode == "sync" else 0  # the demo's held-out crops, or none
    cfg = small(tmp_path, f"trainer.mode={mode}", f"trainer.placement={placement}",
                f"rewards.plugins.text_length={tmp_path / 'my_reward.py'}:text_length", "rewards.weights.text_length=0.5",
                f"data.heldout_per_image={heldout}")
    summary = GRPOTrainer(cfg, progress=False).run()
    assert summary["steps"] == 2
    assert summary["mlflow_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client, run = run_metrics(summary)
    required = reward_metric_names(cfg.rewards.weights) + REQUIRED
    assert {"reward/format/mean", "reward/generation/std", "reward/text_length/mean"} <= set(required)
    missing = [k for k in required if k not in run.data.metrics]
    assert not missing, missing
    m = run.data.metrics
    assert 0 < m["reward/text_length/mean"] <= 1
    weighted = sum(w * m[f"reward/{name}/mean"] for name, w in cfg.rewards.weights.items())
    assert m["reward/total/mean"] == pytest.approx(weighted, abs=1e-6)  # the last step's total includes the plug-in
    assert run.data.metrics["samples/count"] == 4
    # values a working step can have: a bug that logs 0, a negative time or an unbounded fraction fails
    assert 0 <= m["clip_fraction"] <= 1 and m["entropy"] > 0 and 0 <= m["grad_norm"] < 1e3  # 0: equal rewards in each group
    assert m["timing/generate_s"] > 0 and m["timing/learn_s"] > 0 and m["rollout/tokens_per_s"] > 0
    assert m["tokens/text"] + m["tokens/image"] == m["rollout/tokens"]  # all 4 samples trained, every response token
    assert 0 <= m["trace/all_images_fraction"] <= 1 and m["rollout/cfg_unguided_codes"] == 0
    assert run.data.params["trainer.mode"] == mode
    hist = client.get_metric_history(run.info.run_id, "reward/total/mean")
    assert sorted(m.step for m in hist) == [1, 2]
    lag = client.get_metric_history(run.info.run_id, "policy/version_lag")
    assert {m.step: m.value for m in lag}[2] == (1.0 if mode == "async" else 0.0)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in arts and "grids" in arts and "learning_curve.png" in arts
    # the end-of-run verdict: two steps are too few to judge, and it says so
    assert summary["learning"]["steps"] == 2 and summary["learning"]["line"].startswith("verdict: too few steps")
    assert (tmp_path / "learning_curve.png").is_file()
    out = capsys.readouterr().out
    if heldout:  # every reward, the plug-in too, in the held-out columns
        assert set(summary["heldout"]["end"]["means"]) == {*cfg.rewards.weights, "total"}
        assert "held-out (11 prompts, greedy) initial -> GRPO: format" in out
    else:
        assert summary["heldout"] is None and f"held-out eval: none ({tmp_path / 'data' / 'heldout.jsonl'} does not exist" in out


def test_kl_reference_after_in_run_sft_is_the_sft_policy(tmp_path):
    """GRPO's KL is measured from where GRPO starts: the SFT result saved in the run, not the
    initial policy the learner ranks were built from (kl would be large at step 1 then).
    SFT and GRPO read their own manifests (`data.sft_manifest`, `data.rl_manifest`); the
    advantage is normalised per reward."""
    from training.jobs import ensure_data

    base = small(tmp_path, "data.heldout_per_image=1")
    lines = ensure_data(base).read_text().splitlines()
    data = tmp_path / "data"
    (data / "sft.jsonl").write_text("\n".join(lines[:3]) + "\n")  # beside the manifest: same relative paths
    (data / "rl.jsonl").write_text("\n".join(lines[3:8]) + "\n")
    summary = GRPOTrainer(small(tmp_path, "trainer.sft=true", "learner.sft.steps=4", "trainer.steps=1",
                                "learner.grpo.kl_monitor=true", "learner.grpo.normalise=per_reward",
                                f"data.sft_manifest={data / 'sft.jsonl'}",
                                f"data.rl_manifest={data / 'rl.jsonl'}", "data.heldout_per_image=1"),
                          progress=False).run()
    client, run = run_metrics(summary)
    kl = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "kl")}
    assert abs(kl[1]) < 1e-6, kl
    # the held-out prompts (one crop per built-in image) scored greedily with the SFT and the GRPO policy
    held = summary["heldout"]
    assert held["prompts"] == 11 and held["manifest"] == str(data / "heldout.jsonl")
    assert (held["start"]["policy"], held["start"]["version"], held["end"]["policy"], held["end"]["version"]) == (
        "SFT", 0, "GRPO", 1)
    for column in ("start", "end"):
        means = held[column]["means"]
        assert held[column]["prompts"] + held[column]["refused"] == 11 and set(means) == {*cfg_rewards(), "total"}
        assert 0 <= means["format"] <= 1 and 0 <= means["degradation"] <= 1
        # the words each policy wrote: an invalid stage scores 0 but its parsed words still count
        words = held[column]["words"]
        assert 1 <= words["distinct"] <= held[column]["prompts"] and set(words["accuracy"]) == set(SLOTS)
        assert sum(words["accuracy"].values()) / 5 >= means["degradation"] - 1e-9
    heldout_labels = [r.degradation.labels for r in read_manifest(data / "heldout.jsonl")]
    assert held["majority_words"] == majority_accuracy(
        [r.degradation.labels for r in read_manifest(data / "rl.jsonl")], heldout_labels)
    table = (tmp_path / "heldout.md").read_text()
    assert "| SFT (v0) | GRPO (v1) | change |" in table and "| degradation |" in table
    assert "| slot | SFT (v0) | GRPO (v1) | majority word |" in table and "| different answers |" in table
    assert f"{held['end']['means']['total'] - held['start']['means']['total']:+.3f}" in table
    assert {"heldout/end/degradation", "heldout/end/degradation_answers"} <= set(run.data.metrics) and "heldout.md" in {
        a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "sft" / "hf" / "config.json").is_file()
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert (saved["sft_examples"], saved["rl_records"], saved["rl_manifest"]) == (3, 5, str(data / "rl.jsonl"))


def cfg_rewards():
    return list(load_config().rewards.weights)


def test_killed_rollout_worker_and_reward_worker_do_not_lose_samples(tmp_path):
    killed = {}

    def chaos(event, step, trainer):
        if event == "dispatched" and step == 1:
            ray.kill(trainer.rollout.workers[0])  # its prompts are in flight
            ray.kill(trainer.rewards.workers[0])
            killed["step"] = step
        if event == "step_end" and step == 2:
            ray.kill(trainer.rollout.workers[0])  # before the held-out check of the final policy
            killed["end"] = step

    summary = GRPOTrainer(small(tmp_path, "data.heldout_per_image=1"), progress=False, callbacks=[chaos]).run()
    assert killed == {"step": 1, "end": 2} and summary["steps"] == 2
    end = summary["heldout"]["end"]  # every held-out prompt scored, all by the final policy (the replacement's too)
    assert (end["prompts"], end["refused"], end["version"], end["sample_versions"]) == (11, 0, 2, [2])
    client, run = run_metrics(summary)
    counts = client.get_metric_history(run.info.run_id, "samples/count")
    assert [m.value for m in sorted(counts, key=lambda m: m.step)] == [4.0, 4.0]  # none lost, none doubled
    assert run.data.metrics["rollout/worker_restarts"] == 1.0  # the second restart comes after the last step's metrics
    assert run.data.metrics["rewards/actor_restarts"] >= 1.0


def test_resume_after_the_driver_is_killed(tmp_path, mlflow_server, capsys):
    """Killed after a checkpoint, resumed: the same run on a real tracking server, which
    itself goes away during the first resumed step and comes back (issue 27)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "app.cli", "train", "--no-progress", f"run_dir={tmp_path}",
            f"data.output_dir={tmp_path / 'data'}", "trainer.steps=3", "trainer.prompts_per_step=2",
            "rollout.group_size=2", "trainer.sft=false", "trainer.checkpoint_every=1", "rollout.sampling.text_budget=64",
            "learner.schedule.name=linear", "learner.schedule.final_ratio=0.25", "learner.schedule.warmup_steps=1",
            "data.heldout_per_image=1", f"tracking.uri={mlflow_server.url}", "tracking.experiment=resume"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and latest_checkpoint(str(tmp_path)) is None:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver (and its private Ray) dies mid-run
    proc.wait()
    ckpt = latest_checkpoint(str(tmp_path))
    assert ckpt is not None
    done = int(ckpt.name.split("_")[1])
    assert 1 <= done < 3
    cfg = load_config(overrides=args[5:])
    killed_run = DriverState.read(ckpt).mlflow_run_id

    def outage(event, step, trainer):
        if event == "dispatched" and step == done + 1:
            mlflow_server.stop()
        if event == "step_end" and step == done + 1:
            mlflow_server.start()

    summary = GRPOTrainer(cfg, resume=True, progress=False, callbacks=[outage]).run()
    assert summary["steps"] == 3  # history restored from the checkpoint + the remaining steps
    assert summary["learning"]["steps"] == 3  # the per-component curves too (the plot has every step)
    held = summary["heldout"]  # the start column was measured by the killed run, before its first step
    assert (held["start"]["policy"], held["start"]["version"], held["end"]["version"]) == ("initial", 0, 3)
    client, run = run_metrics(summary)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean"))
    assert steps[-1] == 3 and set(range(done + 1, 4)) <= set(steps)
    # the learning-rate schedule goes on where it stopped: every step's rate is the formula's
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert {s: lrs[s] for s in range(1, 4)} == pytest.approx({s: lr_at(s, cfg.learner.schedule, 3, cfg.learner.lr)
                                                              for s in range(1, 4)})
    assert lrs[1] < lrs[2] and lrs[3] < lrs[2]  # warmup, then decay
    # the killed run's MLflow run, on the server, with every reward at every step, nothing lost
    assert killed_run and run.info.run_id == killed_run and run.info.status == "FINISHED"
    for name in reward_metric_names(cfg.rewards.weights):
        assert {m.step for m in client.get_metric_history(run.info.run_id, name)} == {1, 2, 3}, name
    assert "not answering" in capsys.readouterr().out
    assert (summary["tracking"]["outages"], summary["tracking"]["dropped_metric_values"]) == (1, 0)
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "heldout.md"} <= listed
    assert all(any((mlflow_server.dest / run.info.experiment_id / run.info.run_id).rglob(p)) for p in listed)
    assert not (tmp_path / "mlartifacts").exists()
    # exact: the killed-and-resumed run equals an uninterrupted run of the same seed, step for step
    straight_cfg = load_config(overrides=args[5:] + [f"run_dir={tmp_path / 'straight'}", "tracking.uri=''",
                                                     "trainer.heldout_eval=false"])
    straight = GRPOTrainer(straight_cfg, progress=False).run()
    s_client, s_run = run_metrics(straight)
    for key in ("rollout/tokens", "reward/total/mean", "loss/policy", "grad_norm", "entropy"):
        want = {m.step: m.value for m in s_client.get_metric_history(s_run.info.run_id, key)}
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key
    resumed_w, straight_w = (load_weights(latest_checkpoint(str(d)) / "hf") for d in (tmp_path, tmp_path / "straight"))
    assert resumed_w.keys() == straight_w.keys()
    assert all(torch.allclose(resumed_w[n], straight_w[n], rtol=0, atol=1e-6) for n in straight_w)


def test_async_zero3_resume_trains_the_step_in_flight_as_the_uninterrupted_run(tmp_path):
    """Async mode on ZeRO-3 learner ranks: a checkpoint holds the next step's generation, which
    was in flight when it was written (drawn by the previous policy version, for prompts the data
    cursor had handed out). Resumed from step 1, steps 2 and 3 train on exactly what the
    uninterrupted run trained on: the same per-step metrics and the same final weights."""
    import shutil

    from training.run_state import CKPT_DIR, read_pending_step

    args = ["trainer.mode=async", "learner.zero_stage=3", "trainer.steps=3", "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=3", "trainer.heldout_eval=false", "trainer.log_images_every=100"]
    straight = GRPOTrainer(small(tmp_path / "straight", *args), progress=False).run()
    assert straight["steps"] == 3 and straight["learner_version"] == 3
    pending = read_pending_step(tmp_path / "straight" / CKPT_DIR / "step_000001")
    assert pending.step == 1 and len(pending.records) == 2
    assert {s.version for r in pending.collected.results for s in r} == {0}  # one version behind
    assert read_pending_step(tmp_path / "straight" / CKPT_DIR / "step_000003") is None  # nothing follows the last step
    # the run as if killed after step 1: its folder with only the first checkpoint
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("step_000002", "step_000003"))
    resumed = GRPOTrainer(small(tmp_path / "resumed", *args), resume=True, progress=False).run()
    assert resumed["steps"] == 3 and resumed["learner_version"] == 3
    client, run = run_metrics(resumed)  # the copied store: the straight run's steps, then the resumed run's 2 and 3
    for key in ("rollout/tokens", "reward/total/mean", "loss/policy", "grad_norm", "policy/version_lag"):
        by_step = {}
        for m in client.get_metric_history(run.info.run_id, key):
            by_step.setdefault(m.step, []).append(m.value)
        assert [len(by_step[s]) for s in (1, 2, 3)] == [1, 2, 2], key
        for s in (2, 3):
            assert by_step[s][0] == pytest.approx(by_step[s][1], rel=1e-5, abs=1e-7), (key, s, by_step[s])
    resumed_w, straight_w = (load_weights(latest_checkpoint(str(tmp_path / d)) / "hf") for d in ("resumed", "straight"))
    assert resumed_w.keys() == straight_w.keys()
    assert all(torch.allclose(resumed_w[n], straight_w[n], rtol=0, atol=1e-6) for n in straight_w)


def load_weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_invalid_config_fails_before_any_actor(capsys):
    assert cli_main(["train", "trainer.mode=fast"]) == 2
    assert "trainer.mode" in capsys.readouterr().err
    assert cli_main(["train", "rollout.group_size=3", "trainer.prompts_per_step=1"]) == 2
    assert "learner.num_workers" in capsys.readouterr().err
    # overrides after a flag are still overrides (and still validated); a stray word is not
    assert cli_main(["train", "--no-progress", "trainer.mode=fast"]) == 2
    assert "trainer.mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "trainer.steps=1", "--no-progress", "fast"])
    assert "unrecognized arguments: fast" in capsys.readouterr().err
    assert not ray.is_initialized()
