"""MLflow as clusters use it: a real `mlflow server` process on a free loopback port (sqlite
backend, proxied artifact store), stopped and started again on the same port during a run, and
everything read back through MlflowClient. Issue 27."""

import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from training.tracking import Tracker, lost_line, open_run_tracker
from training.tracking_buffer import Outbox
from tests.mlflow_server import free_port
from vlcot.errors import UserError


@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def stored(root: Path, name: str):
    return sorted(p for p in root.rglob(name) if p.is_file())


def test_artifacts_go_where_the_server_says(server, tmp_path):
    """A server's artifacts land in its artifact store (not in run_dir/mlartifacts); an
    existing experiment keeps its own location; system metrics arrive; a local store keeps
    its artifacts under run_dir."""
    (tmp_path / "grid.png").write_bytes(b"png")
    tr = Tracker(server.url, "server-placed", "a", str(tmp_path / "run"), required=True, system_metrics=True,
                 system_metrics_every_s=0.5)
    tr.metrics({"reward/total/mean": 0.5}, step=1)
    tr.artifact(str(tmp_path / "grid.png"), "grids")
    tr.artifact(str(tmp_path / "missing.png"))  # dropped and counted; holds nothing up
    tr.metrics({"reward/total/mean": 0.75}, step=2)
    assert not tr.outbox and tr.outages == 0 and tr.report()["dropped_artifacts"] == 1
    time.sleep(1.2)  # a system-metrics sample or two
    tr.close()
    client = MlflowClient(server.url)
    assert client.get_experiment(tr.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(tr.run_id, "grids")] == ["grids/grid.png"]
    assert [p.parent.name for p in stored(server.dest, "grid.png")] == ["grids"]
    assert not (tmp_path / "run" / "mlartifacts").exists()
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["reward/total/mean"] == 0.75
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)

    elsewhere = tmp_path / "team_store"
    client.create_experiment("team", artifact_location=elsewhere.as_uri())
    tr = Tracker(server.url, "team", "b", str(tmp_path / "run"), required=True)
    tr.artifact(str(tmp_path / "grid.png"))
    tr.close()
    assert len(stored(elsewhere, "grid.png")) == 1 and len(stored(server.dest, "grid.png")) == 1

    local = Tracker("", "local", "c", str(tmp_path / "run2"), required=True)
    local.artifact(str(tmp_path / "grid.png"))
    local.close()
    assert local.uri.startswith("sqlite:///") and len(stored(tmp_path / "run2" / "mlartifacts", "grid.png")) == 1


class Refuser(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_does_not_answer_is_refused_at_start(tmp_path, capsys, caplog):
    """Unreachable or refusing: a UserError naming the URI within seconds (the CLI's train
    refuses before Ray starts, exit 2, one line); required=false: a warning, untracked."""
    import ray

    from app.cli import main as cli_main

    closed = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=f"MLflow tracking at {closed} is not usable \\(connection refused\\)"):
        Tracker(closed, "x", "", str(tmp_path), required=True)
    assert time.perf_counter() - t0 < 10
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # our short-request settings are not left behind

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuser)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    refusing = f"http://127.0.0.1:{httpd.server_port}"
    try:
        with pytest.raises(UserError, match=f"MLflow tracking at {refusing} is not usable"):
            Tracker(refusing, "x", "", str(tmp_path), required=True)
    finally:
        httpd.shutdown()

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=f"MLflow tracking at {hung} is not usable \\(no answer within 1s\\)"):
            Tracker(hung, "x", "", str(tmp_path), required=True, timeout_s=1)
        assert time.perf_counter() - t0 < 10

    off = Tracker(closed, "x", "", str(tmp_path), required=False)
    assert not off.enabled and "training continues untracked" in capsys.readouterr().out
    off.metrics({"a": 1.0}, 1)  # a no-op, no error
    assert lost_line(off.report()) == "; untracked (MLflow unavailable at start)"

    t0 = time.perf_counter()
    assert cli_main(["train", f"run_dir={tmp_path / 'r'}", f"tracking.uri={closed}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("realsr-r1 train: MLflow tracking at " + closed)
    # within a minute (the CLI's imports took 37 s on a loaded machine); MLflow's own retries (7,
    # backoff factor 2) would take about 4 minutes
    assert "Traceback" not in err[0] and time.perf_counter() - t0 < 60 and not ray.is_initialized()
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # its multi-line retry warnings


def test_outage_values_wait_then_arrive_or_are_dropped_and_counted(server, tmp_path):
    """The server stops mid-run: logging neither raises nor stalls; what waited longer than
    buffer_s is dropped and counted; the rest (with its own steps) and an artifact reach the
    server when it is back on the same port."""
    (tmp_path / "old.png").write_bytes(b"png")
    (tmp_path / "new.png").write_bytes(b"png")
    tr = Tracker(server.url, "outage", "o", str(tmp_path), required=True, buffer_s=60)
    tr.metrics({"m": 1.0, "n": 1.0}, step=1)
    server.stop()
    t0 = time.perf_counter()
    tr.metrics({"m": 2.0, "n": 2.0}, step=2)
    tr.artifact(str(tmp_path / "old.png"))
    tr.metrics({"m": 3.0, "n": 3.0}, step=3)
    assert time.perf_counter() - t0 < 8 and len(tr.outbox) == 3 and tr.outages == 1
    now = [time.monotonic()]
    tr.outbox.clock = lambda: now[0]
    now[0] += 61  # steps 2 and 3 and old.png have waited too long ...
    tr.metrics({"m": 4.0, "n": 4.0}, step=4)  # ... step 4 and new.png have not
    tr.artifact(str(tmp_path / "new.png"))
    assert tr.report()["dropped_metric_values"] == 4 and tr.report()["dropped_artifacts"] == 1
    server.start()
    tr.close()  # sends what waits, then ends the run
    client = MlflowClient(server.url)
    assert {m.step: m.value for m in client.get_metric_history(tr.run_id, "m")} == {1: 1.0, 4: 4.0}
    assert [a.path for a in client.list_artifacts(tr.run_id)] == ["new.png"]
    assert client.get_run(tr.run_id).info.status == "FINISHED" and tr.outages == 1
    assert lost_line(tr.report()) == "; MLflow lost 4 metric values and 1 artifacts (1 outages)"


def test_outbox_bounds_and_refused_requests():
    now = [0.0]
    box = Outbox(hold_s=10, max_values=5, clock=lambda: now[0])
    box.add_metrics([1, 2, 3])
    box.add_metrics([4, 5])
    box.add_metrics([6])  # 6 values wait: the oldest item goes
    assert (box.dropped_values, box.waiting_values, len(box)) == (3, 3, 2)
    box.add_artifact("a.png", None)
    assert box.next_send() == ([4, 5, 6], None, 2)
    box.refused(2)
    assert box.next_send() == ([], ("a.png", None), 1) and box.dropped_values == 6
    now[0] = 10.5
    assert box.expire() == 1 and box.dropped_artifacts == 1 and not box


def test_resume_continues_the_same_run_on_the_server(server, tmp_path, capsys):
    """--resume reads the run id from the newest checkpoint before any actor starts and logs
    on into that run; a run id the store does not have is a refusal (a warning and a new run
    with required=false)."""
    from cluster.config import load_config
    from training.run_state import CKPT_DIR, DriverState

    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"tracking.uri={server.url}", "tracking.experiment=resume",
                                 "tracking.system_metrics=false"])
    with pytest.raises(UserError, match=f"--resume: no checkpoint under {tmp_path / CKPT_DIR}"):
        open_run_tracker(cfg, tmp_path, resume=True)
    first = open_run_tracker(cfg, tmp_path, resume=False)
    first.metrics({"m": 1.0}, step=1)
    first.close("FAILED")  # the driver died
    ckpt = tmp_path / CKPT_DIR / "step_000001"
    ckpt.mkdir(parents=True)
    DriverState(1, 1, {}, first.run_id).write(ckpt)
    again = open_run_tracker(cfg, tmp_path, resume=True)
    assert again.run_id == first.run_id and again.resumed and "(resumed)" in capsys.readouterr().out
    again.metrics({"m": 2.0}, step=2)
    again.close()
    client = MlflowClient(server.url)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "m")) == [1, 2]
    assert client.get_run(first.run_id).info.status == "FINISHED"

    DriverState(1, 1, {}, "0" * 32).write(ckpt)
    with pytest.raises(UserError, match=f"run 0{{32}} is not in {server.url}"):
        open_run_tracker(cfg, tmp_path, resume=True)
    cfg.tracking.required = False
    other = open_run_tracker(cfg, tmp_path, resume=True)
    assert other.enabled and other.run_id != "0" * 32 and not other.resumed
    other.close()



def test_tracking_settings_are_validated():
    from cluster.config import ConfigError, load_config

    assert load_config().tracking.required is True  # a run is tracked unless the user says otherwise
    for bad, key in (("tracking.uri=http://:5000", "tracking.uri"), ("tracking.timeout_s=0", "tracking.timeout_s"),
                     ("tracking.buffer_s=-1", "tracking.buffer_s"),
                     ("tracking.system_metrics_every_s=0", "tracking.system_metrics_every_s")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(overrides=[bad])
