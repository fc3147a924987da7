"""Where an actor runs, and the torchrun-style environment of ranks spread over nodes.

Every process group of a run (DeepSpeed's, the weight broadcast's) is hosted at learner rank
0's node address, on a port free on that node, never at 127.0.0.1: a rank on another node
must be able to reach it. `NodePlace` is what an actor reports about where it landed;
`rank_environments` turns the learner ranks' places into each rank's environment.
`role_device` is the device a role's actor runs on: a role configured with GPUs that finds
none stops at start-up with one line saying why (never a silent fall back to CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class NodePlace:
    """Where one actor runs: its Ray node, that node's address, the GPUs Ray gave it."""

    node_id: str
    ip: str
    gpu_ids: List[str]


@dataclass(frozen=True)
class RankEnvironment:
    """What a learner rank needs in its environment before torch.distributed starts."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int
    local_world_size: int
    cuda_visible_devices: Optional[str]  # None: leave what Ray set (CPU ranks have none)

    def variables(self) -> Dict[str, str]:
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
               "MASTER_PORT": str(self.master_port), "LOCAL_RANK": str(self.local_rank),
               "LOCAL_WORLD_SIZE": str(self.local_world_size)}
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env


def here() -> NodePlace:
    """The place of the calling Ray actor or task."""
    import ray

    return NodePlace(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
                     [str(g) for g in ray.get_gpu_ids()])


def node_alive(node_id: str) -> bool:
    """Whether the Ray node `node_id` is alive (as the cluster's control store sees it now)."""
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def rank_environments(places: Sequence[NodePlace], master_port: int) -> List[RankEnvironment]:
    """Rank r's environment from every rank's place. Ranks on one node are numbered locally in
    rank order; each of them sees all GPUs of its node's ranks in that order, so `cuda:LOCAL_RANK`
    (DeepSpeed's device) is its own GPU and NCCL can reach its neighbours directly."""
    by_node: Dict[str, List[int]] = {}
    for rank, place in enumerate(places):
        by_node.setdefault(place.node_id, []).append(rank)
    envs = []
    for rank, place in enumerate(places):
        local = by_node[place.node_id]
        if any(len(places[r].gpu_ids) != 1 for r in local):
            visible = None  # CPU ranks, or ranks with several GPUs each: keep Ray's setting
        else:
            visible = ",".join(places[r].gpu_ids[0] for r in local)
        envs.append(RankEnvironment(rank, len(places), places[0].ip, master_port, local.index(rank), len(local),
                                    visible))
    return envs


def interface_of(ip: str) -> Optional[str]:
    """The network interface that holds `ip` on this machine (None when none does)."""
    import socket

    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def gloo_interface(ip: str) -> Dict[str, str]:
    """GLOO_SOCKET_IFNAME for a process whose node address is `ip`: left alone gloo binds to
    whatever the machine's hostname resolves to, which other nodes may not reach (or to
    loopback). A value the user set wins."""
    import os

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return {}
    name = interface_of(ip)
    return {"GLOO_SOCKET_IFNAME": name} if name else {}


class NoGPUError(RuntimeError):
    """A role configured with GPUs found none it can use (raised at actor start-up)."""


def driver_version() -> Optional[str]:
    """The NVIDIA driver version of this node (`nvidia-smi`), None when there is no nvidia-smi
    or it fails (no driver loaded)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def node_label() -> str:
    """This node for a person reading an error: hostname, and its cluster address when Ray runs."""
    import socket

    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host} ({ray.util.get_node_ip_address()})"
    except Exception:  # the label is a diagnostic; never fail on it
        pass
    return host


def no_gpu_message(role: str, gpus: float, node: str, torch_version: str, torch_cuda: Optional[str],
                   driver: Optional[str], torch_said: str) -> str:
    """The one line a role prints when it is configured with GPUs and finds none."""
    build = f"CUDA {torch_cuda} build" if torch_cuda else "CPU-only build"
    said = " ".join(torch_said.split())  # one line, whatever torch's warning looked like
    return (f"{role}: configured with {gpus:g} GPU(s) but found no usable GPU on node {node}: "
            f"torch {torch_version} ({build}), driver {driver or 'no nvidia-smi'}; torch said: {said}. "
            f"Install a torch build that matches the driver (`realsr-r1 check-env` shows both), "
            f"or set the role's gpus to 0 to run it on CPU.")


def role_device(role: str, gpus: float, node: Optional[str] = None) -> str:
    """The device a role runs on: "cpu" when it is configured with no GPUs, "cuda" when it is
    and torch can use one, else `NoGPUError` with one line naming the role, the node, torch's
    version and CUDA build, the driver version, what torch said and what to do. Never a silent
    fall back to CPU: a CUDA 13 wheel on an older driver only *warns* in
    `torch.cuda.is_available()`."""
    if gpus <= 0:
        return "cpu"
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if available and count > 0:
        return "cuda"
    said = "; ".join(str(w.message) for w in caught) or \
        f"torch.cuda.is_available() is {available}, device count {torch.cuda.device_count()}"
    raise NoGPUError(no_gpu_message(role, gpus, node or node_label(), torch.__version__, torch.version.cuda,
                                    driver_version(), said))
