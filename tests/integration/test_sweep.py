"""Sweeps on a local Ray cluster with the dashboard: run inside the private network namespace
(``scripts/in-private-netns.sh``).

Two sweeps share one Ray cluster and one ``volta dashboard`` (MLflow on 127.0.0.1 with a temp SQLite store):
- a Tune-layer sweep whose trials are tiny stand-in Train runs with known metrics (deterministic ASHA stops,
  resume, MLflow grouping, the UI page);
- the demo sweep in a smaller variant where every trial is a real pre-training run of the debug model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration import sweep as sw
from orchestration.cluster import init_local_ray
from tests.conftest import REPO
from volta.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ray"), pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # More logical CPUs than the 2 physical cores: several 1-CPU trials side by side, as on a small cluster.
    init_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``volta dashboard`` as a user starts it; yields the URL it prints."""
    root = tmp_path_factory.mktemp("dashboard")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "volta.cli",
            "dashboard",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}", url
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def _runs(url: str, experiment: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", timeout=30
    ) as resp:
        exp_id = json.loads(resp.read())["experiment"]["experiment_id"]
    runs = _api(url, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000}).get("runs", [])
    return list(runs)


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _summary(out: str) -> dict[str, Any]:
    # The summary is the last thing on stdout, after Tune's progress tables.
    return dict(json.loads(out[out.rindex("\n{\n") + 1 :]))


# ------------------------------------------------------------------------------- stand-in Train runs
def _stand_in_train_fn(config_dict: dict[str, Any]) -> None:
    """A Train run with known metrics: lower GOT weight is better at every step; logs like the real worker."""
    import ray.train

    from orchestration.tracking import Tracker
    from volta.config import config_from_dict

    config = config_from_dict(config_dict)
    out = Path(config.train.output_dir) / config.ray.run_name
    out.mkdir(parents=True, exist_ok=True)
    with (out / "calls.txt").open("a") as f:
        f.write("started\n")
    tracker = Tracker.start(config)
    steps = config.train.max_steps or 1
    for step in range(1, steps + 1):
        metrics = {"step": float(step), "train/mlm_loss": config.loss.got.weight * (1.0 + 1.0 / step)}
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)
        ray.train.report(metrics)
        time.sleep(0.5)  # long enough for Tune to act on a stop decision before the run ends
    if tracker is not None:
        tracker.finish()


def _stand_in_build(config: Any) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestration.pretrain import storage_target

    return TorchTrainer(
        _stand_in_train_fn,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.0}),
        run_config=ray.train.RunConfig(name=config.ray.run_name, storage_path=storage_target(config)[0]),
    )


@pytest.fixture()
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "synth"
    if not (out / "tokenizer").is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "volta.cli",
                "data",
                "synth",
                "--out",
                str(out),
                "--train-samples",
                "64",
                "--val-samples",
                "32",
                "--image-size",
                "64",
                "--samples-per-shard",
                "32",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
    return out


def _demo_args(synth: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "sweep-demo.yaml"),
        "--set",
        f"data.train_shards={synth}/train",
        "--set",
        f"data.val_shards={synth}/val",
        "--set",
        f"data.tokenizer={synth}/tokenizer",
        "--set",
        f"storage.path={tmp}/ray",
        "--set",
        f"train.output_dir={tmp}/out",
        *[a for item in extra for a in ("--set", item)],
    ]


def test_sweep_early_stops_resumes_and_groups_trials_in_the_dashboard(
    ray_cluster: None,
    dashboard: str,
    synth: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray.cloudpickle

    # Ship the stand-in functions to the trial and Train actors by value (tests/ is not installed).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(sw, "build_trainer", _stand_in_build)
    args = _demo_args(
        synth,
        tmp_path,
        "sweep.name=tune-layer",
        "sweep.metric=train/mlm_loss",  # what the stand-in Train runs report
        "sweep.mode=min",
        "sweep.algorithm=grid",
        "sweep.max_concurrent_trials=2",
        "sweep.grace_period=1",
        "sweep.space={loss.got.weight: {type: choice, values: [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}}",
        f"tracking.uri={dashboard}",
        "tracking.experiment=tune-layer",
    )
    assert sw.main(args) == 0
    summary = _summary(capsys.readouterr().out)
    trials = summary["trials"]
    assert len(trials) == 6 and summary["resumed"] is False
    assert summary["counts"]["early_stopped"] >= 1 and summary["counts"]["error"] == 0
    assert all(t["run_name"] == f"tune-layer-{t['trial_id']}" for t in trials)
    assert summary["best"]["values"] == {"loss.got.weight": 1.0}
    recipe = load_config(summary["best_recipe"])
    assert recipe.loss.got.weight == 1.0 and recipe.sweep.space == {}
    assert Path(summary["best_recipe"]) == tmp_path / "ray" / "tune-layer" / "best-recipe.yaml"
    # Every trial's Train run keeps its checkpoints/state under the sweep's storage prefix.
    runs_dir = tmp_path / "ray" / "tune-layer" / "runs"
    assert sorted(p.name for p in runs_dir.iterdir()) == sorted(t["run_name"] for t in trials)

    # The dashboard groups the sweep: one parent, six nested trials with params, tags and metrics.
    runs = _runs(dashboard, "tune-layer")
    parents = [r for r in runs if _tags(r).get("volta.sweep_role") == "parent"]
    children = [r for r in runs if _tags(r).get("volta.trial_id")]
    assert len(parents) == 1 and len(children) == 6
    parent_id = parents[0]["info"]["run_id"]
    assert _metrics(parents[0])["best/train/mlm_loss"] == pytest.approx(1.125)  # 1 x (1 + 1/8)
    assert _tags(parents[0])["volta.best_run_name"] == summary["best"]["run_name"]
    statuses = {}
    for run in children:
        tags, params, metrics = _tags(run), _params(run), _metrics(run)
        assert tags["volta.sweep"] == "tune-layer" and tags["mlflow.parentRunId"] == parent_id
        assert tags["volta.run_name"] == f"tune-layer-{tags['volta.trial_id']}"
        assert float(params["loss.got.weight"]) in {1.0, 2.0, 4.0, 8.0, 16.0, 32.0}
        assert "train/mlm_loss" in metrics and "sweep/objective" in metrics
        assert run["info"]["status"] != "RUNNING"  # stopped trials are closed by the driver
        statuses[tags["volta.trial_id"]] = tags["volta.trial_status"]
    assert statuses == {t["trial_id"]: t["status"] for t in trials}

    # Running the same command again resumes the finished sweep: no trial runs again.
    calls = {p.parent.name: p.read_text() for p in (tmp_path / "out").glob("*/calls.txt")}
    assert len(calls) == 6 and all(c == "started\n" for c in calls.values())
    assert sw.main(args) == 0
    again = _summary(capsys.readouterr().out)
    assert again["resumed"] is True
    assert [t["run_name"] for t in again["trials"]] == [t["run_name"] for t in trials]
    assert {p.parent.name: p.read_text() for p in (tmp_path / "out").glob("*/calls.txt")} == calls
    assert len(_runs(dashboard, "tune-layer")) == 7


def test_dashboard_ui_renders(dashboard: str) -> None:
    """The MLflow UI page loads in headless Chromium (skipped where Chromium is not installed)."""
    if not CHROMIUM.exists():
        pytest.skip("UI check skipped: /usr/bin/chromium is not installed (the REST checks cover the data)")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--virtual-time-budget=15000",
            "--dump-dom",
            dashboard,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    assert "<html" in dom.lower() and "mlflow" in dom.lower()


def test_demo_sweep_of_real_pretraining_runs(
    ray_cluster: None, dashboard: str, synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _demo_args(
        synth,
        tmp_path,
        "sweep.num_samples=4",
        "sweep.grace_period=1",
        # Two real runs at a time: each DeepSpeed worker holds several GB of host memory.
        "sweep.max_concurrent_trials=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.val_every=1",  # the recipe's metric is val/grounding_acc: ASHA needs it at every rung
        f"tracking.uri={dashboard}",
        "tracking.experiment=demo-small",
    )
    started = time.monotonic()
    code = sw.main(args)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = _summary(out)
    print(f"demo sweep: {time.monotonic() - started:.0f} s, counts {summary['counts']}", file=sys.stderr)
    assert len(summary["trials"]) == 4 and summary["counts"]["error"] == 0
    assert summary["counts"]["early_stopped"] >= 1
    recipe = load_config(summary["best_recipe"])
    for dotted, value in summary["best"]["values"].items():
        section, *rest = dotted.split(".")
        node: Any = getattr(recipe, section)
        for part in rest:
            node = getattr(node, part)
        assert node == pytest.approx(value)
    children = [r for r in _runs(dashboard, "demo-small") if _tags(r).get("volta.trial_id")]
    assert len(children) == 4
    assert all("train/loss" in _metrics(r) and "model.fusion_depth" in _params(r) for r in children)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
