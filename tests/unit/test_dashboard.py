"""``volta dashboard`` argument handling and the MLflow server command it builds (no server started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from volta import dashboard
from volta.cli import build_parser
from volta.errors import UsageError


def test_defaults_bind_loopback_with_a_sqlite_store() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert args.func is dashboard.run_dashboard
    assert (args.host, args.port) == ("127.0.0.1", 5000)
    assert args.backend_store_uri == "sqlite:///mlruns/mlflow.db"
    assert args.artifacts_destination == "mlruns/artifacts"
    assert args.allowed_hosts is None


def test_options_are_parsed() -> None:
    args = build_parser().parse_args(
        [
            "dashboard",
            "--host",
            "0.0.0.0",
            "--port",
            "5123",
            "--backend-store-uri",
            "sqlite:////tmp/x/m.db",
            "--artifacts-destination",
            "s3://b/art",
            "--allowed-hosts",
            "volta-dashboard:5000",
        ]
    )
    assert (args.host, args.port, args.allowed_hosts) == ("0.0.0.0", 5123, "volta-dashboard:5000")


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_ports_exit_2(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["dashboard", "--port", port])
    assert exc.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_server_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = dashboard.build_server_command(
        host="127.0.0.1", port=5001, backend_store_uri="sqlite:///m/db.sqlite", artifacts_destination="art"
    )
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "5001"
    assert flags["--backend-store-uri"] == "sqlite:///m/db.sqlite"
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "art")  # made absolute
    assert "--allowed-hosts" not in cmd
    cmd = dashboard.build_server_command(
        host="0.0.0.0",
        port=5000,
        backend_store_uri="sqlite:///m.db",
        artifacts_destination="s3://b/p",
        allowed_hosts="volta-dashboard:5000",
    )
    assert cmd[cmd.index("--allowed-hosts") + 1] == "volta-dashboard:5000"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://b/p"


def test_dashboard_url() -> None:
    assert dashboard.dashboard_url("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    assert dashboard.dashboard_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert dashboard.dashboard_url("::1", 5000) == "http://[::1]:5000"


def test_a_server_that_exits_is_reported(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(UsageError, match="exited with status 3"):
        dashboard.wait_healthy("http://127.0.0.1:9", proc, timeout_s=5)


def test_store_folders_are_created(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "m.db"
    proc = dashboard.start_server(
        [sys.executable, "-c", "pass"],
        backend_store_uri=f"sqlite:///{db}",
        artifacts_destination=str(tmp_path / "art"),
    )
    proc.wait(timeout=30)
    assert db.parent.is_dir() and (tmp_path / "art").is_dir()
