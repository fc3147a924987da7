import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cfg():
    from cluster.config import load_config

    return load_config()


@pytest.fixture(scope="session")
def stage_sides(tiny_cfg):
    """Codes per side of each drawn image under the default config, written from the paper
    (rough HR/4, middle HR/2, final HR) and the VQ's 8 px per code, not from the code tested."""
    hr = tiny_cfg.image.hr_size
    return {"rough_image": hr // 32, "middle_image": hr // 16, "final_image": hr // 8}


@pytest.fixture(scope="session")
def tiny_policy(tiny_cfg):
    from vlcot.policy import build_tiny_policy

    return build_tiny_policy(tiny_cfg.policy, tiny_cfg.image, tiny_cfg.vq)


@pytest.fixture(scope="session")
def tiny_vq(tiny_cfg):
    from vlcot.vq import VQTokenizer

    return VQTokenizer(tiny_cfg.vq)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray for one test module (4 logical CPUs: the actors time-share 2 cores)."""
    import ray

    if ray.is_initialized():  # a previous module's run left one up
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy_dir(tiny_policy, tmp_path_factory):
    """The tiny policy saved in HF layout, as actors load it."""
    return str(tiny_policy.save(tmp_path_factory.mktemp("policy") / "p"))


@pytest.fixture(scope="session")
def mlflow_server_once(tmp_path_factory):
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_once):
    """One real `mlflow server` for the session (tests/mlflow_server.py), up when a test starts
    (an outage test that failed midway may have left it stopped)."""
    if not mlflow_server_once.up():
        mlflow_server_once.start()
    return mlflow_server_once
