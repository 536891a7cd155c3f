"""Time from ``ray job submit`` to the first optimizer step on a local Ray cluster (token authentication on).

Starts a private Ray head (``ray start --head --block`` with ``RAY_AUTH_MODE=token``, its own temp folder, ports
chosen here, dashboard on 127.0.0.1), waits until its job server answers, then submits the debug recipe on
synthetic shards exactly as the README does (``ray job submit -- bash -c "cd REPO && python
orchestration/pretrain.py ..."``) and watches from outside, with wall-clock times:

- ``cli_s``: until the ``ray job submit --no-wait`` command returned (client start-up + the job accepted);
- ``driver_start_s``: until the job's driver process started (the job server's ``start_time``);
- ``driver_connected_s``: until the driver had connected to the cluster (its "Connected to Ray cluster" log
  line; imports and config validation happen before it);
- ``first_batch_s``: until every rank had its DeepSpeed engine and its first batch (the mtime of each rank's
  ``workers/rank-R.json``, written on its first batch; the latest rank);
- ``first_step_s``: until the first optimizer step was done (rank 0 appends ``metrics.jsonl`` after every step;
  its mtime when the file first holds one line), the headline figure.

A submission the new head rejects because its job agent is not up yet ("No available agent") is retried and the
clock restarts (counted in ``rejected_before_head_ready``). Each later submission reuses the warm cluster (same head, files in the page cache), so ``--repeats 2`` reports a
cold and a warm submission. The head's own start-up is reported apart. Run inside the private network namespace
(Ray listens on every interface it finds)::

    scripts/in-private-netns.sh .venv/bin/python -m bench.submit_latency [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    # The head is stopped with SIGTERM: without this it drains its node for up to 30 s first (Ray 2.60).
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The driver's INFO line "Connected to Ray cluster" is a timed milestone: a quiet-mode setting inherited from
    # the caller (pretrain.py without --verbose sets it in its process) would drop it.
    env.pop("RAY_LOGGER_LEVEL", None)
    return env


def _ray_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RAY), *args], capture_output=True, text=True, timeout=timeout_s, env=_env(), check=False
    )


def free_agent_port_flags() -> list[str]:
    """``ray start`` flags giving one node's agents free ports instead of Ray's fixed defaults (52365, ...).

    A cluster that has just shut down in this network namespace may still hold the defaults, and a second node
    on the same machine needs its own: the node's job agent would otherwise never come up ("No available agent").
    """
    flags = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{flag}={_free_port()}" for flag in flags]


def ensure_auth_token() -> None:
    """Make sure the local Ray token (``~/.ray/auth_token``) exists before ``ray start`` with token auth.

    ``ray start`` refuses to create it ("Token authentication is enabled but no authentication token was found")
    while ``ray.init`` would; on a fresh machine whichever ran first decided whether a head came up.
    ``ray get-auth-token --generate`` creates it once and keeps an existing one.
    """
    subprocess.run(
        [str(RAY), "get-auth-token", "--generate"], env=_env(), capture_output=True, check=True, timeout=60
    )


@contextlib.contextmanager
def _token_auth_in_this_process() -> Iterator[None]:
    """RAY_AUTH_MODE=token for this process's job-server client while the block runs (restored after)."""
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


@contextlib.contextmanager
def local_head(num_cpus: int, temp_dir: Path, log_file: Path) -> Iterator[dict[str, Any]]:
    """A Ray head with token auth, dashboard (job server) on 127.0.0.1; yields its address and start-up time.

    Stopped on exit by signalling only the ``ray start --block`` process this function started, which takes its
    own head processes down with it (never ``ray stop``, which would stop every Ray on the machine).
    """
    if os.environ.get("VOLTA_NETNS") != "1":
        log.warning("not in a private network namespace; Ray may listen on this machine's addresses")
    dash = _free_port()
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    cmd += free_agent_port_flags()
    ensure_auth_token()
    start = time.time()
    with log_file.open("w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = start + 180
        while _ray_cli("job", "list", "--address", address, timeout_s=60).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not start (see {log_file})")
            time.sleep(1)
        yield {"address": address, "startup_s": time.time() - start}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the head's process group: started here, nothing else
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _job_info(client: Any, submission_id: str) -> dict[str, Any]:
    """Status, message and driver start/end times (epoch seconds) of a job, from the job server."""
    job = client.get_job_info(submission_id)
    status = job.status
    return {
        "status": str(getattr(status, "value", status)),
        "message": job.message or "",
        "start_time": job.start_time / 1000 if job.start_time else None,
        "end_time": job.end_time / 1000 if job.end_time else None,
    }


def driver_connected_time(logs: str) -> float | None:
    """Epoch seconds of the driver's "Connected to Ray cluster" log line (local time, ms), or None.

    Searched in the whole log, not line by line: the driver's C++ core writes to the same stderr, and on a loaded
    machine one of its lines can land in front of Python's log record on the same line (CI saw the milestone
    missing while the job had connected).
    """
    match = _CONNECTED.search(logs)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


_CONNECTED = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3})\s+INFO [^\n]*?Connected to Ray cluster")


def submit_once(address: str, data: Path, out: Path, name: str, *, config: str, steps: int) -> dict[str, Any]:
    """Submit one pre-training job and time its milestones from outside; waits for it to finish."""
    from bench.scaling import run_overrides

    sets = run_overrides(data, out, name, workers=2, steps=steps)
    # --verbose: the driver's "Connected to Ray cluster" line is one of the timed milestones (quiet mode drops it).
    inner = [
        sys.executable,
        "orchestration/pretrain.py",
        "--verbose",
        "--config",
        str(Path(config).resolve()),
    ]
    for item in sets:
        inner += ["--set", item]
    entry = f"cd {shlex.quote(str(REPO))} && exec {shlex.join(inner)}"
    metrics = out / name / "metrics.jsonl"
    ranks = [out / name / "workers" / f"rank-{r}.json" for r in range(2)]
    rejected = 0
    while True:
        t0 = time.time()
        cli = _ray_cli(
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            name,
            "--no-wait",
            "--",
            "bash",
            "-c",
            entry,
        )
        t_cli = time.time()
        # A new head's job server can answer before its agent does; Ray asks to try again. Such a rejected
        # attempt is the head still starting, not submission latency, so the clock restarts.
        if cli.returncode != 0 and "No available agent" in cli.stderr and rejected < 30:
            rejected += 1
            time.sleep(1)
            continue
        # A loaded head's dashboard can drop the connection before it answers (measured on a busy 2-core CI
        # machine: RemoteDisconnected). The request may have been taken; the fixed submission id makes a second
        # try either submit it or answer that it exists, which means the first one was.
        if cli.returncode != 0 and "Connection aborted" in cli.stderr and rejected < 30:
            rejected += 1
            time.sleep(1)
            continue
        if cli.returncode != 0 and rejected and "already exists" in cli.stderr:
            cli = subprocess.CompletedProcess(cli.args, 0, cli.stdout, cli.stderr)
        break
    if cli.returncode != 0:
        raise RuntimeError(f"ray job submit failed: {cli.stderr.strip()[-2000:]}")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)  # sends the CLI's token while RAY_AUTH_MODE=token (see run)
    first_step = None
    deadline, next_status = t0 + 900, t0
    while first_step is None:
        if metrics.exists():
            mtime, lines = metrics.stat().st_mtime, metrics.read_text().count("\n")
            if lines == 1:
                first_step = mtime
                break
            if lines > 1:
                raise RuntimeError("polling missed the first step (two steps within one poll)")
        if time.time() >= next_status:  # a failed job would otherwise be waited on until the deadline
            info = _job_info(client, name)
            if info["status"] in ("FAILED", "STOPPED"):
                raise RuntimeError(f"job {name} {info['status']}: {info['message']}")
            next_status = time.time() + 5
        if time.time() > deadline:
            raise RuntimeError(f"job {name}: no optimizer step within 900 s")
        time.sleep(0.02)
    while True:  # let the job finish so the next submission starts on a quiet cluster
        info = _job_info(client, name)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            break
        time.sleep(1)
    logs = client.get_job_logs(name)
    (out / f"{name}.log").write_text(logs)
    if info["status"] != "SUCCEEDED":
        raise RuntimeError(f"job {name} ended {info['status']}: {info['message']}")
    result: dict[str, Any] = {
        "cli_s": t_cli - t0,
        "first_batch_s": max(p.stat().st_mtime for p in ranks) - t0,
        "first_step_s": first_step - t0,
        "job_total_s": (info["end_time"] - t0) if info["end_time"] else None,
        "driver_start_s": (info["start_time"] - t0) if info["start_time"] else None,
        "rejected_before_head_ready": rejected,
    }
    connected = driver_connected_time(logs)
    result["driver_connected_s"] = (connected - t0) if connected is not None else None
    return result


def run(
    config: str = "configs/debug.yaml",
    *,
    repeats: int = 2,
    steps: int = 2,
    num_cpus: int = 2,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Start a head, submit ``repeats`` jobs one after another, and report each one's milestones."""
    from bench.scaling import write_bench_shards
    from volta.config import load_config

    image_size = load_config(config).model.image.img_size
    with contextlib.ExitStack() as stack:
        root = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        data = write_bench_shards(root / "data", samples=64, image_size=image_size)
        # A short temp path: Ray's socket paths must fit in 107 bytes.
        ray_tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vray-", dir="/tmp")))
        head = stack.enter_context(local_head(num_cpus, ray_tmp, root / "ray-head.log"))
        stack.enter_context(_token_auth_in_this_process())
        submissions = []
        for i in range(repeats):
            res = submit_once(
                head["address"], data, root / "runs", f"latency-{i}", config=config, steps=steps
            )
            res["cluster"] = "cold" if i == 0 else "warm"
            log.info("submission %d: %s", i, res)
            submissions.append(res)
    return {
        "config": config,
        "workers": 2,
        "head_startup_s": head["startup_s"],
        "submissions": submissions,
        "first_step_s": {s["cluster"] + str(i): s["first_step_s"] for i, s in enumerate(submissions)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--repeats", type=int, default=2, help="submissions to the same head (first = cold)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per job")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    r = run(args.config, repeats=args.repeats, steps=args.steps, out_dir=args.out)
    print(
        f"ray job submit -> first optimizer step, {r['config']}, 2 workers (head start-up "
        f"{r['head_startup_s']:.1f} s, not included)",
        file=sys.stderr,
    )
    keys = ("cli_s", "driver_start_s", "driver_connected_s", "first_batch_s", "first_step_s", "job_total_s")
    print("  " + "".join(f"{k:>19s}" for k in ("submission", *keys)), file=sys.stderr)
    for s in r["submissions"]:
        cells = "".join(f"{s[k]:19.1f}" if s.get(k) is not None else f"{'-':>19s}" for k in keys)
        print(f"  {s['cluster']:>19s}{cells}", file=sys.stderr)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
