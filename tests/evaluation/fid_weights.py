"""pyiqa's FID Inception with random weights, saved where the real file goes: the layout is real,
the numbers mean nothing (nothing downloads here). Runs in the IQA environment:

    .venv-iqa/bin/python -m tests.evaluation.fid_weights OUT.pth
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_random_fid_inception(path: str) -> None:
    from unittest import mock

    import pyiqa.archs.inception as inception
    import torch

    torch.manual_seed(0)
    with mock.patch.object(inception, "load_pretrained_network"):  # build the architecture only
        net = inception.fid_inception_v3()
    for m in net.modules():  # He-initialised: activations keep their scale through ~50 layers (the
        if isinstance(m, torch.nn.Conv2d):  # default init fades them to zero, and every FID to 0)
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def write_in_iqa_env(path: Path) -> Path:
    """Write the file from the IQA environment (pyiqa and torchvision live there)."""
    from cluster.config import EnvConfig
    from cluster.interpreters import iqa_python

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([iqa_python(EnvConfig()), "-m", "tests.evaluation.fid_weights", str(path)], cwd=REPO, check=True)
    return path


if __name__ == "__main__":
    write_random_fid_inception(sys.argv[1])
