import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cfg():
    from cluster.config import load_config

    return load_config()


@pytest.fixture(scope="session")
def tiny_policy(tiny_cfg):
    from vlcot.policy import build_tiny_policy

    return build_tiny_policy(tiny_cfg.policy, tiny_cfg.image, tiny_cfg.vq)


@pytest.fixture(scope="session")
def tiny_vq(tiny_cfg):
    from vlcot.vq import VQTokenizer

    return VQTokenizer(tiny_cfg.vq)
