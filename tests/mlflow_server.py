"""A real `mlflow server` for tests: `python -m mlflow server` (the package ships it) on a free
loopback port, sqlite backend, proxied artifact store under its folder. It runs in a process
group of its own, which `stop` ends by id; `start` again comes back on the same port with the
same stores (the outage tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = Path(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dest = self.root / "artifacts"  # --artifacts-destination: where the server stores artifacts
        self.proc = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait_s: float = 60) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
               "--artifacts-destination", str(self.dest), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner process
        with open(self.root / "server.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited: " + (self.root / "server.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not listening on {self.url} after {wait_s}s")

    def stop(self) -> None:
        if self.up():
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this object started, by its id
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
