"""A `ray start --head` of a test's own, and its clean-up by process id.

`ray stop` ends every Ray process on the machine, other tests' and jobs' too. A head started
here gets a temp folder of its own (`--temp-dir`), which every process it starts names on its
command line (gcs_server, raylet, monitors, dashboard); the workers the raylet forks rename
themselves (`ray::IDLE`) but are its descendants. `stop_head` ends exactly those processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple

from app.submit import NO_AGENT


def _processes() -> Dict[int, Tuple[int, str]]:
    """pid -> (parent pid, command line) of every process visible here."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = (ppid, args)
    return out


def processes_of(temp_dir: str) -> Set[int]:
    """Processes naming `temp_dir` on their command line, and all their descendants."""
    procs = _processes()
    found = {pid for pid, (_, args) in procs.items() if temp_dir in args and pid != os.getpid()}
    grown = True
    while grown:
        grown = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grown = True
    return found


def start_head(ray_bin: Path, args: List[str], env: Dict[str, str]) -> str:
    """`ray start --head ARGS` with a temp folder of its own; returns that folder."""
    temp_dir = tempfile.mkdtemp(prefix="realsr-head-")
    subprocess.run([str(ray_bin), "start", "--head", "--temp-dir", temp_dir, *args], env=env, check=True,
                   capture_output=True, timeout=120)
    return temp_dir


def wait_for_job_agent(ray_bin: Path, address: str, env: Dict[str, str], timeout_s: float = 90.0) -> None:
    """Submit a no-op job until the head takes it: `ray start` returns before the head's dashboard
    agent accepts jobs, and a job submitted in between fails with "No available agent to submit job"."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--", "true"], env=env,
                             capture_output=True, text=True, timeout=timeout_s)
        text = out.stdout + out.stderr
        if out.returncode == 0:
            return
        if NO_AGENT not in text or time.time() > deadline:
            raise RuntimeError(f"the head at {address} took no job within {timeout_s:.0f} s: {text[-800:]}")
        time.sleep(2.0)


def stop_head(temp_dir: str, grace_s: float = 10.0) -> List[int]:
    """End the processes of the head started with `temp_dir` (SIGTERM, then SIGKILL after
    `grace_s`), then remove the folder; returns their ids. Nothing else on the machine is
    touched."""
    pids = processes_of(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return sorted(pids)
