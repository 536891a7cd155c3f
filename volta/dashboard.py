"""``volta dashboard``: a self-hosted MLflow tracking server for runs and sweeps (SQLite store, local artifacts).

Starts ``mlflow server`` as a child process bound to 127.0.0.1 unless told otherwise, waits until it answers
``/health``, prints the URL and keeps serving until interrupted. Point ``tracking.uri`` at that URL and every
pre-training run and sweep trial logs its params, per-step metrics and sweep grouping there. ``--store DIR``
serves a store folder that runs wrote directly (``tracking.uri=sqlite:///DIR/mlflow.db``, as ``make demo`` does):
its ``mlflow.db`` and ``artifacts/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from volta.errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "build_server_command",
    "dashboard_url",
    "register",
    "run_dashboard",
    "start_server",
    "store_locations",
    "wait_healthy",
]


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def _sqlite_parent(uri: str) -> Path | None:
    """The folder a ``sqlite:///`` store file lives in (created before the server starts), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).expanduser().parent


def store_locations(folder: str | Path) -> tuple[str, str]:
    """The backend store URI and the artifact folder of a store folder: ``sqlite:///FOLDER/mlflow.db`` (absolute)
    and ``FOLDER/artifacts``."""
    root = Path(folder).expanduser().resolve()
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")


def build_server_command(
    *,
    host: str,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    allowed_hosts: str | None = None,
    workers: int = 1,
) -> list[str]:
    """The ``mlflow server`` command line: the given store, proxied artifacts in ``artifacts_destination``
    (a local folder made absolute, or a URI such as ``s3://bucket/prefix``), bound to ``host:port``.
    """
    if "://" not in artifacts_destination:
        artifacts_destination = str(Path(artifacts_destination).expanduser().resolve())
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def dashboard_url(host: str, port: int) -> str:
    """The URL to open: the bound address, or 127.0.0.1 when the server listens on every interface."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (tests) has no descriptor
        return None


def start_server(
    cmd: Sequence[str], *, backend_store_uri: str, artifacts_destination: str
) -> subprocess.Popen[bytes]:
    """Create the store and artifact folders and start the server in its own process group (so stopping the
    dashboard stops every server worker with it).
    """
    parent = _sqlite_parent(backend_store_uri)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    if "://" not in artifacts_destination:
        Path(artifacts_destination).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        # The server's own output goes to stderr: stdout carries only the URL line, for scripts.
        return subprocess.Popen(list(cmd), start_new_session=True, stdout=_stderr_fd())
    except OSError as err:
        raise UsageError(f"dashboard: cannot start {cmd[0]}: {err.strerror}") from None


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll ``url/health`` until it answers 200; raise UsageError when the server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise UsageError(f"dashboard: mlflow server exited with status {code} (port in use? see above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise UsageError(f"dashboard: no answer from {url}/health within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (the server and its workers), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_dashboard(args: argparse.Namespace) -> int:
    """Start the tracking server, wait for ``/health``, print the URL, serve until SIGINT/SIGTERM; exit status."""
    if args.store is not None:
        args.backend_store_uri, args.artifacts_destination = store_locations(args.store)
    cmd = build_server_command(
        host=args.host,
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        allowed_hosts=args.allowed_hosts,
        workers=args.workers,
    )
    url = dashboard_url(args.host, args.port)
    proc = start_server(
        cmd, backend_store_uri=args.backend_store_uri, artifacts_destination=args.artifacts_destination
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_healthy(url, proc, args.timeout)
        # The URL goes to stdout (one line, for scripts); set it as tracking.uri in a recipe.
        print(url, flush=True)
        log.info("dashboard at %s (store %s); Ctrl-C stops it", url, args.backend_store_uri)
        code = proc.wait()
        return 0 if code == 0 else 1
    except KeyboardInterrupt:
        log.info("stopping the dashboard")
        return 0
    finally:
        _stop(proc)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``volta dashboard`` to the ``volta`` command."""
    p = subparsers.add_parser(
        "dashboard", help="self-hosted MLflow tracking server for runs and sweeps (prints its URL)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (127.0.0.1; 0.0.0.0 in a container)"
    )
    p.add_argument("--port", type=_port, default=5000, help="port (5000)")
    p.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlruns/mlflow.db",
        help="run/metric store: SQLAlchemy URI (sqlite:///mlruns/mlflow.db)",
    )
    p.add_argument(
        "--artifacts-destination",
        default="mlruns/artifacts",
        help="artifact store served through the server: a folder or s3://bucket/prefix (mlruns/artifacts)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host headers to accept besides localhost/private IPs, e.g. volta-dashboard:5000 (MLflow's list)",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="serve the store folder DIR (DIR/mlflow.db and DIR/artifacts), e.g. runs/demo/mlflow after "
        "`make demo`; replaces --backend-store-uri and --artifacts-destination",
    )
    p.add_argument("--workers", type=int, default=1, help="server worker processes (1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server (120)")
    p.set_defaults(func=run_dashboard)
