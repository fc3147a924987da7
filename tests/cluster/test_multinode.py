"""Training on a real multi-node Ray cluster: four Ray nodes, each in its own network namespace
(tests/multinode.py), the job submitted with `realsr-r1 submit` from the head's namespace.

One run walks the whole story, because each cluster and job start costs a minute on this
machine: learner ranks, rollout worker and reward worker on different nodes (the rendezvous and
the weight group at learner rank 0's node address); a rollout node joins mid-run and the pool
grows onto it; that node is killed mid-run and the run goes on with the worker that is left;
then `--resume` continues the run.
"""

import json
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.multinode import BIN, NamespaceCluster

pytestmark = pytest.mark.slow
STEPS = 14  # the pool grows onto node 3 a few steps in (a 64-px demo step takes 1-3 s here); the
            # steps after the kill must outlast the job log's delay, or the loss is never seen
PROMPTS, GROUP = 2, 2


@pytest.fixture(scope="module")
def cluster():
    why = NamespaceCluster.unavailable()
    if why:
        pytest.skip(f"no namespace cluster here: {why}")
    c = NamespaceCluster()
    try:
        c.start_node(0, cpus=2, resources={"learner_slot": 1})
        c.start_node(1, cpus=2, resources={"learner_slot": 1, "reward_slot": 1})
        c.start_node(2, cpus=2, resources={"rollout_slot": 1})
        yield c
    finally:
        c.shutdown()


def submit_args(run_dir: Path, steps: int, resume: bool = False):
    return [str(BIN / "realsr-r1"), "submit", *(["--resume"] if resume else []), "--address", None, f"run_dir={run_dir}",
            f"data.output_dir={run_dir / 'data'}", f"trainer.steps={steps}", f"trainer.prompts_per_step={PROMPTS}",
            f"rollout.group_size={GROUP}", "learner.sft.steps=4", "learner.num_workers=2",
            "learner.resources.learner_slot=1", "rollout.resources.rollout_slot=1", "rewards.resources.reward_slot=1",
            "rollout.autoscale=true", "rollout.max_workers=2", "trainer.checkpoint_every=1",
            "trainer.weight_sync_timeout_s=180", "trainer.actor_start_timeout_s=300",
            "rollout.sampling.text_budget=64", "trainer.log_images_every=100",
            "data.heldout_per_image=0"]  # the held-out check is tested in tests/training/test_driver.py


def run_job(cluster, args, log_file, on_line=None, timeout_s=900):
    """Run the job, passing each output line to `on_line`; a job still running after
    `timeout_s` (printing or silent) is killed with its process group and fails the test."""
    args = [cluster.dashboard if a is None else a for a in args]
    proc = cluster.submit(args, timeout_s, start_new_session=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def read():  # a thread: the main loop waits on the queue with the deadline, never on a read
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    got, deadline, expired = [], time.time() + timeout_s, False
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            expired = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if line is None:
            break
        got.append(line)
        if on_line is not None:
            on_line(line)
    proc.wait(timeout=60)
    text = "".join(got)
    with open(log_file, "a") as f:  # kept beside the run for a look after a failure
        f.write(text)
    assert not expired, f"the job ran past {timeout_s} s; its last lines:\n" + "".join(got[-20:])
    return proc.returncode, text


def metric(summary, key):
    from mlflow.tracking import MlflowClient

    history = MlflowClient(summary["mlflow_uri"]).get_metric_history(summary["mlflow_run_id"], key)
    return {m.step: m.value for m in history}


def test_a_run_spans_nodes_grows_onto_a_new_node_survives_losing_it_and_resumes(cluster, tmp_path):
    run_dir = tmp_path / "run"
    events = {}

    def on_line(line):  # add a rollout node after step 1; kill it once the pool has grown onto it
        if "step 1/" in line and "added" not in events:
            events["added"] = time.time()
            cluster.start_node(3, cpus=2, resources={"rollout_slot": 1})
        elif "rollout pool: 1 -> 2 workers" in line:
            events["grown"] = True
        elif events.get("grown") and "killed" not in events and line.startswith("step "):
            events["killed"] = cluster.kill_node(3)  # the next step's prompts are out on both workers

    code, log = run_job(cluster, submit_args(run_dir, STEPS), tmp_path / "jobs.log", on_line)
    assert code == 0, log[-6000:]
    assert "killed" in events, f"the pool never grew onto node 3:\n{log[-4000:]}"
    a = [cluster.address(i) for i in range(4)]
    assert f"rendezvous {a[0]}:" in log and "MLflow: " in log
    summary = json.loads((run_dir / "train_summary.json").read_text())
    nodes = summary["actor_nodes"]
    # learner ranks on two nodes, the reward worker beside rank 1, the rollout worker on its own node:
    # DeepSpeed's rendezvous, the weight broadcast and the reward calls all cross the veth links
    assert nodes["learner"] == [a[0], a[1]] and nodes["rewards"] == [a[1]] and nodes["rollout"] == [a[2]]
    assert summary["learner_version"] == STEPS and summary["rollout_versions"] == [STEPS]
    assert summary["rollout_workers_lost"] == 1

    workers, lost, count = (metric(summary, k) for k in ("rollout/workers", "rollout/workers_lost", "samples/count"))
    assert workers[1] == 1 and 2 in workers.values(), workers  # the pool grew onto the joined node
    lost_at = min(s for s, v in lost.items() if v > 0)
    assert all(workers[s] == 1 for s in workers if s > lost_at), workers  # and went on with one worker
    assert count == {s: PROMPTS * GROUP for s in range(1, STEPS + 1)}, count  # no sample lost or duplicated

    code, log = run_job(cluster, submit_args(run_dir, STEPS + 1, resume=True), tmp_path / "jobs.log")
    assert code == 0, log[-6000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:06d}'}" in log
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["learner_version"] == STEPS + 1 and summary["rollout_versions"] == [STEPS + 1]
    assert sorted(metric(summary, "samples/count")) == list(range(1, STEPS + 2))
