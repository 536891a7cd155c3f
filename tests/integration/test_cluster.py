"""`ray job submit` against a two-node Ray cluster on one machine (head + a joining node, both on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.submit_latency import ensure_auth_token, free_agent_port_flags
from tests.conftest import REPO
from tests.fixtures_pretrain import run_overrides, synth_data

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.timeout(900)]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def two_node_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A head (1 CPU) and a second node (1 CPU) joined to it; yields (gcs address, dashboard URL).

    Token authentication is on (as in production); every `ray` client below inherits RAY_AUTH_MODE=token.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ensure_auth_token()
    temp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--temp-dir",
            temp,
            *common,
            *free_agent_port_flags(),
        ],
        stdout=open(tmp_path / "head.log", "wb"),  # noqa: SIM115 - lives as long as the process
        stderr=subprocess.STDOUT,
        env=env,
    )
    procs = [head]
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait(
            lambda: (
                subprocess.run([RAY, "job", "list", "--address", url], capture_output=True).returncode == 0
            )
        )
        node = subprocess.Popen(
            [RAY, "start", "--address", f"127.0.0.1:{gcs}", *common, *free_agent_port_flags()],
            stdout=open(tmp_path / "node.log", "wb"),  # noqa: SIM115 - lives as long as the process
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(node)
        _wait(lambda: _alive_nodes(f"127.0.0.1:{gcs}") == 2)
        yield f"127.0.0.1:{gcs}", url
    finally:
        for p in reversed(procs):
            _stop(p)


def _alive_nodes(address: str) -> int:
    out = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True)
    if out.returncode != 0 or "Active:" not in out.stdout:
        return 0
    active = out.stdout.split("Active:")[1].split("Pending:")[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def _wait(ready: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(1)
    raise TimeoutError("the Ray cluster did not come up")


def test_job_submit_spreads_workers_over_two_nodes_and_splits_shards(
    two_node_cluster: tuple[str, str], synth_data: Path, tmp_path: Path
) -> None:
    _, url = two_node_cluster
    out = tmp_path / "out"
    sets = run_overrides(synth_data, out, "cluster", **{"train.max_steps": 2, "train.checkpoint_every": 2})
    entry = " ".join([sys.executable, "orchestration/pretrain.py", "--config", "configs/debug.yaml", *sets])
    job = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--", "bash", "-c", f"cd {REPO} && {entry}"],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    ranks = [json.loads((out / "cluster" / "workers" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # one worker per node (1 CPU each)
    shards = [{int(k) // 16 for k in r["first_batch_keys"]} for r in ranks]  # 16 samples per shard
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert (out / "cluster" / "final" / "model.safetensors").exists()
