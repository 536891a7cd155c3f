"""``ray job submit --working-dir . -- python orchestration/pretrain.py`` against a remote-style Ray head.

The head runs from an unrelated folder with no AWS settings, as a cluster node would: the code, recipes and the
tokenizer arrive in the uploaded working directory, S3 credentials and endpoint in the job's runtime_env, shards
come from S3 (a moto server) and every output goes to ``storage.path`` on S3. The working directory is a copy of
the repository without its .gitignore (so .rayignore alone has to keep local data and runs out of the upload)
and with a stale local dataset and run folder planted in it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from bench.submit_latency import ensure_auth_token, free_agent_port_flags
from tests.fixtures_data import aws_env, moto_endpoint, upload_folder
from tests.fixtures_pretrain import synth_data
from tests.fixtures_source import copy_source_tree
from tests.integration.test_cluster import RAY, _free_port, _wait

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.timeout(900)]
BUCKET = "volta-remote"
PLANTED = 8 * 2**20  # bytes of incompressible data in each of data/ and runs/: far more than the code
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")


@pytest.fixture
def remote_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A 1-CPU Ray head with token auth, started away from the repository with no AWS variables.

    Yields (dashboard URL, the head's temp folder). Only its PATH is shared with this machine's venv: a cluster
    image has the dependencies installed, not the code.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ensure_auth_token()
    temp = Path(tempfile.mkdtemp(prefix="vw", dir="/tmp"))  # short: Ray's socket paths stay under 107 bytes
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PYTHONPATH"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    gcs, dash = _free_port(), _free_port()
    flags = ["--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    flags += ["--temp-dir", str(temp), "--num-cpus", "1", "--node-ip-address", "127.0.0.1"]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--disable-usage-stats", *flags, *free_agent_port_flags()],
        cwd=node_dir,
        stdout=open(tmp_path / "head.log", "wb"),  # noqa: SIM115 - lives as long as the process
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait(
            lambda: (
                subprocess.run([RAY, "job", "list", "--address", url], capture_output=True).returncode == 0
            )
        )
        yield url, temp
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGINT)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def working_dir_with_local_clutter(dest: Path, synth: Path) -> Path:
    """A copy of the repository (no .gitignore) plus the tokenizer to ship, a local dataset and an old run."""
    wd = copy_source_tree(dest, leave_out=[".gitignore"])
    shutil.copytree(synth / "tokenizer", wd / "tokenizers" / "synth")
    shutil.copytree(synth, wd / "data" / "synth")
    for folder in ("data/synth", "runs/old-run"):
        (wd / folder).mkdir(parents=True, exist_ok=True)
        (wd / folder / "blob.bin").write_bytes(os.urandom(PLANTED))
    return wd


def test_job_with_working_dir_trains_from_s3_and_ships_only_the_code(
    remote_head: tuple[str, Path], moto_endpoint: str, synth_data: Path, tmp_path: Path
) -> None:
    url, temp = remote_head
    for split in ("train", "val"):
        upload_folder(moto_endpoint, synth_data / split, BUCKET, f"data/{split}")
    wd = working_dir_with_local_clutter(tmp_path / "wd", synth_data)
    runtime_env = {"env_vars": {**{k: os.environ[k] for k in AWS_KEYS}, "AWS_ENDPOINT_URL": moto_endpoint}}
    sets = {
        "data.train_shards": f"s3://{BUCKET}/data/train",
        "data.val_shards": f"s3://{BUCKET}/data/val",
        "data.tokenizer": "tokenizers/synth",  # a folder inside the working directory: it travels with the code
        "storage.path": f"s3://{BUCKET}/runs",
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "ray.num_workers": 1,
        "ray.run_name": "remote",
    }
    submit = ["--address", url, "--submission-id", "volta-remote", "--working-dir", str(wd)]
    submit += ["--runtime-env-json", json.dumps(runtime_env)]
    entry = ["python", "orchestration/pretrain.py", "--config", "configs/debug.yaml"]
    entry += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    job = subprocess.run(
        [RAY, "job", "submit", *submit, "--", *entry],
        capture_output=True,
        text=True,
        timeout=800,
    )
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower()

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/remote/")
    keys = {o["Key"].removeprefix("runs/remote/") for p in pages for o in p.get("Contents", [])}
    assert "final/model.safetensors" in keys, sorted(keys)
    assert any(k.startswith("export/") for k in keys), sorted(keys)
    assert {"config.yaml", "metrics.jsonl"} <= keys

    from ray.job_submission import JobSubmissionClient

    uri = JobSubmissionClient(url).get_job_info("volta-remote").runtime_env["working_dir"]
    package = uri.removeprefix("gcs://").removesuffix(".zip")
    shipped = temp / "session_latest" / "runtime_resources" / "working_dir_files" / package
    assert (shipped / "orchestration" / "pretrain.py").is_file()
    assert (shipped / "tokenizers" / "synth" / "tokenizer_config.json").is_file()
    assert not (shipped / "data").exists() and not (shipped / "runs" / "old-run").exists()
    # runs/ there holds only this job's local cache (train.output_dir, relative to the unpacked working dir).
    code = sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file() and "runs" not in f.parts)
    assert code < PLANTED, f"{code} bytes shipped"
