"""A real multi-node Ray cluster on this machine: one network namespace per node.

Each node is a namespace with its own address in a private test range, joined to the others
by a veth pair on a bridge (the bridge lives in a hub namespace of its own, so nothing of the
machine's own network changes). `ray start` runs inside each namespace, so every node has a
raylet, an object store and an address of its own, and traffic between nodes crosses the veth
links, as between machines. The filesystem and PID space are shared (so one interpreter path
works everywhere, unlike a real cluster).

Clean-up ends only the processes inside this cluster's namespaces, by id (`ray stop` would end
every Ray on the machine), then deletes the namespaces. Creating namespaces needs root; without
it `NamespaceCluster.unavailable()` says why and the tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

BIN = Path(sys.executable).parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


class NamespaceCluster:
    def __init__(self, tag: Optional[str] = None):
        tag = tag or f"{os.getpid() % 100000}"
        self.prefix = f"rn{tag}"  # interface names stay under 15 characters
        self.subnet = f"10.{100 + os.getpid() % 100}.{os.getpid() % 250}"
        self.hub = f"{self.prefix}h"
        self.nodes: Dict[int, str] = {}  # node index -> namespace
        self.killed: set = set()  # indices of nodes killed by kill_node
        self.head_port = 6390
        self.dashboard_port = 8265
        self.temp_dir = f"/tmp/{self.prefix}"
        self.env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled",
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why this machine cannot host the cluster (None when it can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "the `ip` tool (iproute2) is missing"
        probe = f"rnprobe{os.getpid() % 100000}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    # ---- topology -----------------------------------------------------------------------------
    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def head_address(self) -> str:
        return self.address(0)

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_address}:{self.dashboard_port}"

    def _namespace(self, i: int) -> str:
        ns = f"{self.prefix}n{i}"
        if not self.nodes:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("netns", "add", ns)
        node_end, hub_end = f"{self.prefix}v{i}", f"{self.prefix}b{i}"
        _ip("link", "add", node_end, "type", "veth", "peer", "name", hub_end)
        _ip("link", "set", node_end, "netns", ns)
        _ip("link", "set", hub_end, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", hub_end, "master", "br0")
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", node_end)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", node_end, "up")
        self.nodes[i] = ns
        return ns

    def run_in(self, i: int, cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside node i's namespace."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(["ip", "netns", "exec", self.nodes[i], *cmd], **kwargs)

    def start_node(self, i: int, cpus: int = 2, resources: Optional[Dict[str, float]] = None) -> None:
        """Node 0 is the head (GCS, dashboard and job server); others join it."""
        self._namespace(i)
        cmd = [str(BIN / "ray"), "start", "--node-ip-address", self.address(i), "--num-cpus", str(cpus),
               "--resources", json.dumps(resources or {}), "--disable-usage-stats"]
        # a temp dir per node: nodes of one machine would otherwise unpack the job's working dir
        # into the same folder, replacing it under the running driver (machines do not share it)
        cmd += ["--temp-dir", f"{self.temp_dir}/n{i}"]
        if i == 0:
            cmd += ["--head", "--port", str(self.head_port), "--dashboard-host", self.head_address,
                    "--dashboard-port", str(self.dashboard_port)]
        else:
            cmd += ["--address", f"{self.head_address}:{self.head_port}"]
        out = self.run_in(i, cmd, capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"ray start on node {i} ({self.address(i)}) failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        self.wait_for_nodes(len(set(self.nodes) - self.killed))

    def alive_nodes(self) -> List[str]:
        """Addresses of the nodes the cluster reports alive."""
        code = ("import ray, json; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        out = self.run_in(0, [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(self.env, RAY_ADDRESS=f"{self.head_address}:{self.head_port}"))
        if out.returncode:
            raise RuntimeError(f"cannot list the cluster's nodes: {out.stderr[-1500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> List[str]:
        deadline = time.time() + timeout_s
        while True:
            alive = self.alive_nodes()
            if len(alive) == count:
                return alive
            if time.time() > deadline:
                raise RuntimeError(f"the cluster has {len(alive)} live nodes ({alive}) after {timeout_s:.0f}s, "
                                   f"expected {count}")
            time.sleep(2)

    # ---- failures and clean-up ------------------------------------------------------------------
    def pids(self, i: int) -> List[int]:
        out = _ip("netns", "pids", self.nodes[i], check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_node(self, i: int) -> List[int]:
        """Kill every process of node i at once (a machine losing power); returns their ids."""
        self.killed.add(i)
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def submit(self, entrypoint: List[str], timeout_s: float, **kwargs) -> subprocess.Popen:
        """`realsr-r1 submit` (or any command) from inside the head's namespace, running."""
        return subprocess.Popen(["ip", "netns", "exec", self.nodes[0], *entrypoint], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

    def shutdown(self) -> None:
        for i in sorted(self.nodes, reverse=True):  # workers first, the head last
            self.kill_node(i)
        time.sleep(1)
        for i in self.nodes:
            for pid in self.pids(i):  # anything still there (a process started while killing)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", self.nodes[i], check=False)
        if self.nodes:
            _ip("netns", "del", self.hub, check=False)
        self.nodes = {}
        shutil.rmtree(self.temp_dir, ignore_errors=True)
