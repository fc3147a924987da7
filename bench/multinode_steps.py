"""GRPO step time with one rollout node against two, on a real multi-node Ray cluster of
network namespaces on this machine (tests/multinode.py; needs root).

Nodes: the head (driver, learner rank 0, reward worker) and two rollout nodes. The same job runs
twice through `realsr-r1 submit`: with one rollout worker (on one rollout node), then with two
(one per rollout node, SPREAD). Reported from each run's MLflow metrics: median step time
(generate + reward + learn + sync) and generation time over the steps after the first, and the
ratio of two nodes to one. On this 2-core machine every node shares the same cores, so the
ratio shows the overhead of spreading the work, not the speed-up separate machines give.

    sudo .venv/bin/python bench/multinode_steps.py [--steps 6] [--prompts 4] [--group 4]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.multinode import BIN, NamespaceCluster  # noqa: E402


def run(cluster, run_dir: Path, workers: int, args) -> dict:
    cmd = [str(BIN / "realsr-r1"), "submit", "--address", cluster.dashboard, f"run_dir={run_dir}",
           f"data.output_dir={run_dir / 'data'}", f"trainer.steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
           f"rollout.group_size={args.group}", f"rollout.num_workers={workers}", "learner.num_workers=1",
           "learner.sft.steps=4", "rollout.resources.rollout_slot=1", "rollout.sampling.text_budget=64",
           "trainer.log_images_every=1000", "trainer.checkpoint_every=1000"]
    proc = cluster.submit(cmd, 1200)
    out, _ = proc.communicate(timeout=1200)
    if proc.returncode:
        sys.exit(f"the job with {workers} rollout workers failed:\n{out[-4000:]}")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_uri"])

    def series(key):
        return {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)}

    parts = [series(f"timing/{k}") for k in ("generate_s", "reward_s", "learn_s", "sync_s")]
    steps = sorted(parts[0])[1:]  # the first step warms the engines up
    return {"nodes": sorted(set(summary["actor_nodes"]["rollout"])),
            "step_s": statistics.median(sum(p[s] for p in parts) for s in steps),
            "generate_s": statistics.median(parts[0][s] for s in steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    args = p.parse_args()
    why = NamespaceCluster.unavailable()
    if why:
        sys.exit(f"no namespace cluster here: {why}")
    cluster = NamespaceCluster()
    try:
        cluster.start_node(0, cpus=3)
        cluster.start_node(1, cpus=2, resources={"rollout_slot": 1})
        cluster.start_node(2, cpus=2, resources={"rollout_slot": 1})
        with tempfile.TemporaryDirectory() as tmp:
            one = run(cluster, Path(tmp) / "one", 1, args)
            two = run(cluster, Path(tmp) / "two", 2, args)
    finally:
        cluster.shutdown()
    print(f"settings: {args.steps} steps of {args.prompts} prompts x {args.group} samples, median over steps 2..")
    for name, r in (("one rollout node", one), ("two rollout nodes", two)):
        print(f"{name} {r['nodes']}: step {r['step_s']:.2f}s, generation {r['generate_s']:.2f}s")
    print(f"two nodes / one node: step time {two['step_s'] / one['step_s']:.2f}x, "
          f"generation {two['generate_s'] / one['generate_s']:.2f}x (shared cores here)")


if __name__ == "__main__":
    main()
