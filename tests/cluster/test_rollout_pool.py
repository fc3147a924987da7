"""The rollout pool on a real local Ray when workers die between steps: dropped with
autoscale, replaced without it, and a clear error when no replacement can start."""

import time

import pytest
import ray

from cluster.config import load_config
from cluster.rollout_pool import RolloutPool

pytestmark = pytest.mark.slow


def pool_of(policy_dir, workers, autoscale):
    cfg = load_config(overrides=["rollout.engine=hf", f"rollout.num_workers={workers}", f"rollout.autoscale={autoscale}",
                                 "rollout.group_size=2", "rollout.sampling.text_budget=16"])
    return RolloutPool(cfg.rollout, policy_dir, cfg.image, cfg.policy, ready_timeout_s=60)


def kill(actor):
    """Kill an actor and wait until Ray says it is dead (a call right after ray.kill can still run)."""
    ray.kill(actor)
    for _ in range(100):
        try:
            ray.get(actor.version.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def test_autoscale_drops_a_dead_worker_and_names_its_node(ray_local, policy_dir):
    pool = pool_of(policy_dir, 2, True)
    try:
        node = pool.group.ready_reports[1]["node_ip"]
        survivor = pool.workers[0]
        kill(pool.workers[1])
        change = pool.check_workers()
        assert change.lost_nodes == [node] and change.replaced == [] and bool(change)
        assert pool.workers == [survivor] and pool.lost_count == 1
        assert not pool.check_workers()  # nothing changes when every worker answers
    finally:
        pool.shutdown()


def test_without_autoscale_a_dead_worker_is_replaced_or_the_error_names_it(ray_local, policy_dir):
    pool = pool_of(policy_dir, 1, False)
    try:
        kill(pool.workers[0])
        assert pool.check_workers().replaced == [0] and pool.restarts == 1
        assert ray.get(pool.workers[0].version.remote()) == 0
        node = pool.group.ready_reports[0]["node_ip"]
        kill(pool.workers[0])
        pool.group.options["resources"] = {"a_node_that_left": 1}  # its replacement has nowhere to go
        pool.group.ready_timeout_s = 3
        with pytest.raises(RuntimeError, match=rf"rollout worker 0 on node {node} died and no replacement could start "
                                               r"\(rollout actors not ready after 3s: .*a_node_that_left.*\); with "
                                               r"rollout.autoscale=true .* --resume"):
            pool.check_workers()
    finally:
        pool.shutdown()
