"""Weight sync transports, chosen by config, between a real learner group and vLLM rollout workers."""

from pathlib import Path

import numpy as np
import pytest
import ray

from cluster.config import load_config
from cluster.learner_group import LearnerGroup
from cluster.rollout_pool import PoolChange, RolloutPool
from cluster.weight_sync import sync_living_workers
from tests.cluster.test_rollout_pool import kill
from tests.learner.test_learner_group import grpo_batch
from vlcot.trace import build_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def actors(ray_local, policy_dir, tiny_cfg):
    cfg = load_config(overrides=["learner.num_workers=1", "learner.num_cpus=1", "learner.lr=5e-2",
                                 "rollout.num_workers=1", "rollout.group_size=2", "rollout.max_model_len=1536",
                                 "rollout.sampling.text_budget=16"])
    learner = LearnerGroup(cfg.learner, policy_dir)
    pool = RolloutPool(cfg.rollout, policy_dir, cfg.image, cfg.policy)
    yield cfg, learner, pool
    pool.shutdown()
    learner.shutdown()


def assert_every_tensor_synced(worker, learner):
    """Every parameter the learner holds equals the worker engine's, by name after the engine's
    own mapping (vLLM fuses q/k/v and gate/up and packs linear weights for the CPU GEMM;
    `checkpoint_view` undoes both), not one sample tensor."""
    want = learner.full_state_dict()
    got = ray.get(worker.checkpoint_view.remote())
    assert set(want) <= set(got), sorted(set(want) - set(got))
    differ = [n for n in want if not np.array_equal(np.asarray(want[n], dtype=np.float32), got[n])]
    assert not differ, differ


TRANSPORTS = {"network group": ["trainer.weight_sync=network", "trainer.weight_sync_shm=false"],
              "network, same node through shared memory": ["trainer.weight_sync=network"],
              "filesystem": ["trainer.weight_sync=filesystem"]}


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_each_transport_brings_every_worker_to_the_learner(actors, tiny_policy, tmp_path, name):
    cfg, learner, pool = actors
    cfg = load_config(overrides=TRANSPORTS[name] + [f"trainer.weight_sync_dir={tmp_path}", "rollout.num_workers=1"])
    pool.connect_weights(learner, cfg)  # the pool owns its weight sync
    sync = pool.weight_sync
    learner.grpo_step(grpo_batch(tiny_policy.layout, list(TRANSPORTS).index(name) + 1, n=2))
    stats = pool.sync_weights(5).stats
    assert stats["sync/bytes"] > 0 and stats["timing/sync_s"] > 0
    if cfg.trainer.weight_sync == "network":  # the one worker shares learner rank 0's node
        shm = cfg.trainer.weight_sync_shm
        assert (stats["sync/shm_workers"], stats["sync/network_workers"]) == ((1.0, 0.0) if shm else (0.0, 1.0))
        assert ("sync/shm_gb_per_s" in stats) == shm and ("sync/buckets" in stats) != shm
    assert_every_tensor_synced(pool.workers[0], learner)
    version = 5
    if cfg.trainer.weight_sync == "network":  # later syncs to the same group leave out the frozen VQGAN
        learner.grpo_step(grpo_batch(tiny_policy.layout, 7, n=2))
        version = 6
        again = pool.sync_weights(version).stats
        assert 0 < again["sync/bytes"] < stats["sync/bytes"]
        assert_every_tensor_synced(pool.workers[0], learner)
    prompt = build_prompt(np.zeros((16, 16), dtype=int), tiny_policy.codec, tiny_policy.layout)
    assert pool.collect(pool.submit([prompt], 0))[0][0].version == version
    # a worker killed mid-dispatch is replaced and brought to the current weights before it reruns
    batch = pool.submit([prompt], 1)
    ray.kill(pool.workers[0])
    samples = pool.collect(batch, version)[0]
    assert samples[0].version == version and pool.restarts >= 1
    assert_every_tensor_synced(pool.workers[0], learner)
    pool.disconnect_weights()
    if cfg.trainer.weight_sync == "network":
        assert not Path(sync.folder).exists()  # the shared-memory file is gone with the group


def test_a_node_lost_during_the_sync_is_dropped_and_the_sync_done_again(actors, policy_dir, tiny_policy):
    """The race a real cluster has: a worker answers the pool's probe, then its node goes down
    before the broadcast reaches it. The sync fails, the worker is dropped and the survivor
    still ends the step holding the learner's weights."""
    _, learner, _ = actors
    cfg = load_config(overrides=["trainer.weight_sync=network", "trainer.weight_sync_shm=false",
                                 "trainer.weight_sync_timeout_s=20", "rollout.engine=hf", "rollout.num_workers=2",
                                 "rollout.autoscale=true", "rollout.group_size=2", "rollout.sampling.text_budget=16"])
    pool = RolloutPool(cfg.rollout, policy_dir, cfg.image, cfg.policy, ready_timeout_s=60)
    try:
        pool.connect_weights(learner, cfg)
        survivor, node = pool.workers[0], pool.group.ready_reports[1]["node_ip"]
        probe = pool.check_workers

        def answers_then_goes_down():
            change = probe()
            kill(pool.workers[1])
            pool.check_workers = probe
            return change

        pool.check_workers = answers_then_goes_down
        learner.grpo_step(grpo_batch(tiny_policy.layout, 11, n=2))
        report = pool.sync_weights(9)
        assert report.lost_nodes == [node] and pool.workers == [survivor] and pool.lost_count == 1
        assert report.stats["sync/network_workers"] == 1.0
        assert ray.get(survivor.version.remote()) == 9
        assert_every_tensor_synced(survivor, learner)
    finally:
        pool.shutdown()  # closes its weight sync first


class ScriptedPool:
    """Probe answers in order (the code around the transport, without actors)."""

    def __init__(self, *changes):
        self.changes = list(changes)

    def check_workers(self):
        return self.changes.pop(0)


class FailingSync:
    def __init__(self, failures):
        self.failures, self.formed = failures, 0

    def workers_changed(self, added, version):
        self.formed += 1

    def sync(self, version):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("gloo: connection reset by peer")
        return {"version": version}


def test_a_failed_sync_with_every_worker_answering_is_raised_not_retried():
    sync = FailingSync(failures=1)
    with pytest.raises(RuntimeError, match="connection reset"):
        sync_living_workers(sync, ScriptedPool(PoolChange([], []), PoolChange([], [])), 3)
    assert sync.formed == 0
    # two nodes lost one after the other during two syncs: the group is formed again each time
    sync = FailingSync(failures=2)
    report = sync_living_workers(sync, ScriptedPool(PoolChange([], []), PoolChange(["10.0.0.3"], []),
                                                    PoolChange([], [1])), 3)
    assert report.stats == {"version": 3} and report.lost_nodes == ["10.0.0.3"] and sync.formed == 2


def test_unknown_transport_is_a_config_error():
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.weight_sync.*'shm' not in \['network', 'filesystem'\]"):
        load_config(overrides=["trainer.weight_sync=shm"])
