"""The layers contract (pyproject.toml, [tool.importlinter]; map in docs/layers.md): imports run
downward only, cluster > evaluation > rollout | learner | rewards > comm > vlcot, with no
exceptions listed. Runs the real `lint-imports` of this interpreter's environment on the repo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_no_package_imports_one_above_its_layer():
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} not found: install the dev extra (pip install -e '.[dev]')")
    # the checkout's packages first, whatever another install of the project on the path says
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"],  # reads pyproject.toml in cwd
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert " 0 broken" in report, report  # contracts were checked, none broke
