"""Tracking is best-effort: a tracking server that is away never fails training, and what was logged while it
was away arrives when it answers again. Run inside the private network namespace (``scripts/in-private-netns.sh``).

One real ``mlflow server`` (as ``volta dashboard`` starts it: SQLite store, proxied artifacts, 127.0.0.1) serves
the module. Outages come two ways: a gate in front of it that refuses connections while shut (the client sees
exactly what a stopped server shows, without the cost of starting MLflow again), and a real kill and restart of
the server on the same port and store. The trackers run on a hand-advanced clock, so their retry schedule is
exact and no test waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration.tracking import MLFLOW_HTTP_DEFAULTS, Tracker, TrackingLimits
from tests.fixtures_tracking import MlflowServer, free_port
from volta.config import load_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("mlflow-best-effort"),  # one worker, one server for the module
    pytest.mark.timeout(600),
]


class _Gate:
    """127.0.0.1:port forwarding to the server while open, refusing connections while shut (open connections
    are cut too): an outage the client cannot tell from a stopped server.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def shut(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            socks, self._conns = [*([listener] if listener else []), *self._conns], []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on a listener
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _Clock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with pytest.MonkeyPatch.context() as mp:
        # The server's background job runner (more Python processes to import MLflow) is not needed here.
        mp.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture()
def gate(server: MlflowServer) -> Iterator[_Gate]:
    server.start()  # back up if a test killed it
    g = _Gate(server.port)
    yield g
    g.shut()


@pytest.fixture(autouse=True)
def mlflow_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracker.start's HTTP defaults, undone after each test; a long timeout so a busy machine's slow answer
    is never mistaken for an outage (a refused connection fails at once whatever the timeout).
    """
    for name in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")


def _start(url: str, name: str, clock: _Clock, **limits: Any) -> Tracker:
    config = load_config(
        None, [f"tracking.uri={url}", "tracking.experiment=best-effort", f"ray.run_name={name}"]
    )
    tracker = Tracker.start(config, limits=TrackingLimits(**limits), clock=clock)
    assert tracker is not None
    return tracker


def _client(server: MlflowServer) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def _history(server: MlflowServer, run_id: str | None, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of ``key``, in the order they were logged."""
    assert run_id is not None
    points = _client(server).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.timestamp, m.step))]


def _tracking_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "orchestration.tracking"]


def test_a_server_down_at_start_gets_the_run_and_every_step_when_it_comes_up(
    server: MlflowServer, gate: _Gate, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="orchestration.tracking")
    tracker = _start(gate.url, "down-at-start", clock)
    assert tracker.run_id is None and not tracker.up and tracker.failed_calls == 1
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # set where unset...
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"  # ...kept where set

    for step in range(20):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "skipped": float("nan")}, step=step)
    assert tracker.failed_calls == 1  # the steps waited for the retry instead of asking a dead server
    clock.now += 5.0  # the first retry is due: one attempt, then the gap doubles to 10 s
    tracker.log_metrics({"train/loss": 1.0 / 21}, step=20)
    clock.now += 5.0
    tracker.log_metrics({"train/loss": 1.0 / 22}, step=21)
    assert tracker.failed_calls == 2 and tracker.buffered_metrics == 22

    gate.open()
    clock.now += 5.0
    tracker.log_metrics({"train/loss": 1.0 / 23}, step=22)
    assert tracker.up and tracker.run_id is not None and tracker.buffered_metrics == 0
    assert _history(server, tracker.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(23)]
    run = _client(server).get_run(tracker.run_id)
    assert run.data.params["ray.run_name"] == "down-at-start"  # params of a run opened late
    assert run.data.tags["volta.run_name"] == "down-at-start"

    tracker.finish()
    assert _client(server).get_run(tracker.run_id).info.status == "FINISHED"
    lines = _tracking_lines(caplog)
    assert [line for line in lines if line.startswith("WARNING")] == [lines[0]]  # one line for the outage
    assert "INFO tracking back: sent 23 buffered metrics" in lines
    assert len(lines) == 3, lines  # failed, run opened, back: nothing per step


def test_c_a_full_buffer_drops_the_oldest_points_and_counts_them(server: MlflowServer, gate: _Gate) -> None:
    clock = _Clock()
    tracker = _start(gate.url, "overflow", clock, max_buffered_metrics=10)
    for step in range(25):
        tracker.log_metrics({"a": float(step), "b": -float(step)}, step=step)
    assert (tracker.dropped_metrics, tracker.buffered_metrics) == (40, 10)

    gate.open()
    tracker.finish()  # the final flush does not wait for the retry schedule
    assert _history(server, tracker.run_id, "a") == [(s, float(s)) for s in range(20, 25)]
    assert _history(server, tracker.run_id, "b") == [(s, -float(s)) for s in range(20, 25)]
    assert tracker.counters() == {
        "tracking/buffered_metrics": 0.0,
        "tracking/dropped_metrics": 40.0,
        "tracking/dropped_artifacts": 0.0,
        "tracking/failed_calls": 1.0,
    }


def test_d_an_artifact_logged_while_down_is_uploaded_after_recovery(
    server: MlflowServer, gate: _Gate, tmp_path: Path
) -> None:
    clock = _Clock()
    tracker = _start(gate.url, "artifact-while-down", clock)
    picture = tmp_path / "heatmaps-00000010.png"
    picture.write_bytes(b"\x89PNG not really")
    tracker.log_artifact(str(picture), "heatmaps")
    assert tracker.failed_calls == 1 and tracker.dropped_artifacts == 0

    gate.open()
    clock.now += 5.0
    tracker.log_metrics({"train/loss": 1.0}, step=10)
    assert tracker.up and tracker.run_id is not None
    client = _client(server)
    assert [f.path for f in client.list_artifacts(tracker.run_id, "heatmaps")] == [
        "heatmaps/heatmaps-00000010.png"
    ]
    local = client.download_artifacts(
        tracker.run_id, "heatmaps/heatmaps-00000010.png", str(tmp_path / "back")
    )
    assert Path(local).read_bytes() == picture.read_bytes()
    tracker.finish()


def test_points_the_server_rejects_are_dropped_and_do_not_block_the_rest(
    server: MlflowServer, gate: _Gate
) -> None:
    gate.open()
    tracker = _start(gate.url, "rejected", _Clock())
    tracker.log_metrics({"bad/../name": 1.0}, step=0)  # MLflow refuses names that are not unique paths
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    assert tracker.up and tracker.dropped_metrics == 1 and tracker.buffered_metrics == 0
    assert _history(server, tracker.run_id, "train/loss") == [(1, 0.5)]
    tracker.finish()


def test_finish_while_the_server_is_down_gives_up_quietly(
    gate: _Gate, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = _start(gate.url, "finish-down", _Clock(), finish_deadline_s=0.0)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.log_artifact("/nonexistent/picture.png")
    tracker.finish()
    assert "gave up at finish; 1 metric points and 1 artifacts not sent" in caplog.text


def test_b_a_server_killed_mid_run_and_restarted_gets_the_missed_steps_once(server: MlflowServer) -> None:
    server.start()
    clock = _Clock()
    tracker = _start(server.url, "killed-mid-run", clock)
    for step in range(5):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    assert tracker.up and tracker.sent_metrics == 5
    run_id = tracker.run_id

    server.stop(signal.SIGKILL)
    for step in range(5, 10):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    assert not tracker.up and tracker.failed_calls == 1 and tracker.buffered_metrics == 5

    server.start()  # same port and store: the run is still there
    clock.now += 5.0
    tracker.log_metrics({"train/loss": 10.0}, step=10)
    assert tracker.up and tracker.run_id == run_id and tracker.sent_metrics == 11
    assert _history(server, run_id, "train/loss") == [(s, float(s)) for s in range(11)]
    tracker.finish()
    assert _client(server).get_run(run_id).info.status == "FINISHED"
