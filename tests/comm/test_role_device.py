"""A role configured with GPUs that finds none stops at start-up with one line saying why
(the role, the node, torch and its CUDA build, the driver, what torch said, what to do);
a role with 0 GPUs runs on CPU as before. This machine has no GPU, so every GPU role here
must refuse."""

import socket

import pytest
import torch

from comm.nodes import NoGPUError, no_gpu_message, role_device

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_a_role_with_no_gpus_runs_on_cpu():
    assert role_device("learner", 0) == "cpu"
    assert role_device("rewards", 0.0) == "cpu"


@needs_no_gpu
def test_a_role_with_gpus_and_none_usable_raises_one_line_that_says_what_to_do():
    with pytest.raises(NoGPUError) as err:
        role_device("rollout worker 2", 1, node="node-7 (10.0.0.7)")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("rollout worker 2: configured with 1 GPU(s) but found no usable GPU on node node-7 (10.0.0.7)")
    assert f"torch {torch.__version__} (" in msg
    assert (f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build") in msg
    assert "driver " in msg and "torch said: " in msg and "device count 0" in msg
    assert "Install a torch build that matches the driver" in msg and "set the role's gpus to 0" in msg


@needs_no_gpu
def test_the_default_node_is_this_hosts_name():
    with pytest.raises(NoGPUError, match=f"on node {socket.gethostname()}"):
        role_device("learner", 2)


def test_the_message_keeps_torchs_multi_line_warning_on_one_line():
    said = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 12080).\n"
            "Please update your GPU driver by downloading and installing a new version")
    msg = no_gpu_message("learner", 1, "gpu-3 (10.1.0.3)", "2.14.0+cu130", "13.0", "570.86.15", said)
    assert "\n" not in msg
    assert ("learner: configured with 1 GPU(s) but found no usable GPU on node gpu-3 (10.1.0.3): torch 2.14.0+cu130 "
            "(CUDA 13.0 build), driver 570.86.15; torch said: CUDA initialization: The NVIDIA driver on your system is "
            "too old (found version 12080). Please update") in msg
    assert "driver no nvidia-smi" in no_gpu_message("learner", 1, "n", "2.13.0+cpu", None, None, "x")


@needs_no_gpu
def test_the_learner_refuses_before_deepspeed_or_any_model_load(tmp_path):
    from learner.config import LearnerConfig
    from learner.engine import LearnerEngine

    missing = tmp_path / "no-policy-here"  # loading it would fail differently: the check comes first
    with pytest.raises(NoGPUError, match=r"^learner: configured with 1 GPU\(s\)"):
        LearnerEngine(LearnerConfig(num_gpus=1, num_workers=1), str(missing))
    assert not torch.distributed.is_initialized()


@needs_no_gpu
def test_the_reward_actor_refuses_and_a_cpu_reward_actor_still_runs_on_cpu():
    from rewards.worker import RewardWorker
    from rewards.config import RewardsConfig

    device = RewardWorker.__ray_actor_class__._device
    with pytest.raises(NoGPUError, match="^rewards: configured with 1 GPU"):
        device(RewardsConfig(num_gpus=1))
    assert device(RewardsConfig()) == "cpu"
    cfg = RewardsConfig()
    cfg.generation.device = "cuda"  # asked for CUDA by name: refused the same way
    with pytest.raises(NoGPUError, match="^rewards: "):
        device(cfg)


@needs_no_gpu
def test_a_rollout_worker_refuses_before_building_its_engine(tmp_path):
    from rollout.config import RolloutConfig
    from rollout.worker import RolloutWorker

    cls = RolloutWorker.__ray_actor_class__
    worker = cls.__new__(cls)
    with pytest.raises(NoGPUError, match="^rollout worker 3: configured with 1 GPU"):
        cls.__init__(worker, RolloutConfig(gpus_per_worker=1), str(tmp_path / "no-policy"), None, None, 3)
    assert not hasattr(worker, "engine")
