"""ActorGroup on a real local Ray: start, ready-timeout naming resources, replace, sharded calls."""

import pytest
import ray

from cluster.actor_group import ActorGroup

pytestmark = pytest.mark.slow


@ray.remote
class Echo:
    def __init__(self, slot, fail=False):
        if fail:
            raise ValueError(f"slot {slot} cannot start: bad setting x")
        self.slot = slot

    def ready(self):
        return {"slot": self.slot}

    def add(self, a, b):
        return self.slot * 100 + a + b


def test_start_call_shards_replace_and_shutdown(ray_local):
    g = ActorGroup("echo", Echo, 3, lambda slot: (slot,), dict(num_cpus=0.1))
    assert g.ready_reports == [{"slot": 0}, {"slot": 1}, {"slot": 2}] and len(g) == 3
    assert g.run("add", 1, 2) == [3, 103, 203]
    assert g.run("add", 5, shards=[10, 20, 30]) == [15, 125, 235]  # one shard per actor, after the args
    with pytest.raises(ValueError, match="2 shards for 3 echo actors"):
        g.call("add", 1, shards=[1, 2])
    old = g.workers[1]
    ray.kill(old)
    assert g.replace(1) == {"slot": 1} and g.restarts == 1 and g.workers[1] is not old
    assert g.run("add", 0, 0) == [0, 100, 200]
    g.shutdown()
    assert g.workers == []


def test_ready_timeout_names_what_was_asked_and_what_is_free(ray_local):
    with pytest.raises(RuntimeError, match=r"echo actors not ready after 3s: each asks for \{'num_cpus': 0.1, 'num_gpus': 1\}; "
                                           r"the cluster has .*CPU.* free"):
        ActorGroup("echo", Echo, 1, lambda slot: (slot,), dict(num_cpus=0.1, num_gpus=1), ready_timeout_s=3)


def test_a_constructor_error_is_one_clear_line(ray_local):
    with pytest.raises(RuntimeError, match=r"a echo actor failed to start: ValueError: slot 0 cannot start: bad setting x"):
        ActorGroup("echo", Echo, 2, lambda slot: (slot, slot == 0), dict(num_cpus=0.1))


def test_grow_and_remove_keep_slots_dense(ray_local):
    g = ActorGroup("echo", Echo, 2, lambda slot: (slot,), dict(num_cpus=0.1))
    assert g.grow(2) == [{"slot": 2}, {"slot": 3}] and len(g) == 4 and len(g.ready_reports) == 4
    gone = g.workers[1]
    g.remove([1])
    assert len(g) == 3 and gone not in g.workers and g.ready_reports == [{"slot": 0}, {"slot": 2}, {"slot": 3}]
    assert g.run("add", 0, 0) == [0, 200, 300]  # later actors moved down, each still itself
    g.shutdown()


def test_growth_that_cannot_start_names_the_demand_and_keeps_the_group(ray_local):
    g = ActorGroup("echo", Echo, 1, lambda slot: (slot,), dict(num_cpus=0.1), ready_timeout_s=60)
    g.ready_timeout_s = 3  # short for the growth that cannot start (the first start may be slow on a busy machine)
    g.options["num_gpus"] = 1  # no GPU here: the new actor cannot be placed
    with pytest.raises(RuntimeError, match=r"echo actors not ready after 3s: each asks for .*'num_gpus': 1"):
        g.grow(1)
    g.options.pop("num_gpus")
    assert len(g) == 1 and g.run("add", 1, 1) == [2]  # the running actor is untouched
    g.shutdown()
