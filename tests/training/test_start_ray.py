"""start_ray: a job never waits forever on a private local Ray that an earlier job in the same
process started too small (seen: the reward worker of a GRPO run stayed pending for 600 s after
an SFT job had left a 2-CPU Ray up)."""

import ray

from training import jobs


def test_private_ray_too_small_for_the_next_job_is_restarted_bigger():
    if ray.is_initialized():
        ray.shutdown()
    try:
        jobs.start_ray(1)
        first = ray.cluster_resources()["CPU"]
        jobs.start_ray(int(first) + 3)
        assert ray.cluster_resources()["CPU"] == first + 3
        jobs.start_ray(1)  # big enough: kept as it is
        assert ray.cluster_resources()["CPU"] == first + 3
    finally:
        ray.shutdown()


def test_a_ray_this_module_did_not_start_is_never_restarted():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        jobs.start_ray(8)  # warns: the actors would wait for the cluster to grow
        assert ray.get_runtime_context().gcs_address == address and ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
