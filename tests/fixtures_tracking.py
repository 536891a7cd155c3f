"""A real ``mlflow server`` for tests, as ``volta dashboard`` starts it (SQLite store, proxied artifacts, 127.0.0.1),
that can be killed and started again on the same port and store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from volta.dashboard import build_server_command, start_server, wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on a fixed 127.0.0.1 port and store, started and killed at will; runs persist."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root}/mlflow.db"
        self.artifacts = str(root / "artifacts")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = build_server_command(
            host="127.0.0.1",
            port=self.port,
            backend_store_uri=self.store,
            artifacts_destination=self.artifacts,
        )
        self.proc = start_server(cmd, backend_store_uri=self.store, artifacts_destination=self.artifacts)
        wait_healthy(self.url, self.proc, timeout_s=300)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the server's process group (server and workers) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)
