"""What a sweep needs from the cluster and what it produced: per-trial resources, how many trials run at once,
the sweep's folder and the summary of its trials (JSON-ready). No Tune run is started here."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestration.sweep_space import plain_value
from volta.config import VoltaConfig

log = logging.getLogger("volta.sweep")

__all__ = ["TRIAL_DRIVER_RESOURCES", "max_concurrent_trials", "per_trial_resources", "summarize", "sweep_dir"]

# What the trial's own function holds: no CPU (its Train workers request their own, so trials pack exactly
# by worker demand even on a 2-core machine) but a non-empty bundle, which Tune requires.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0.0, "memory": float(256 * 2**20)}


def per_trial_resources(config: VoltaConfig) -> dict[str, float]:
    """Cluster resources one trial holds: its Train workers (``num_workers x`` CPUs [and GPUs]) plus the
    trial function's own bundle, keyed like ``ray.cluster_resources()``.
    """
    r = config.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + TRIAL_DRIVER_RESOURCES["cpu"]}
    if r.use_gpu:
        need["GPU"] = r.num_workers * r.gpus_per_worker
    need["memory"] = TRIAL_DRIVER_RESOURCES["memory"]
    return need


def max_concurrent_trials(
    cluster: Mapping[str, float], per_trial: Mapping[str, float], configured: int | None = None
) -> int:
    """How many trials run at once: ``configured`` when set, else as many as the cluster's current resources
    hold (at least 1, so an autoscaling cluster can grow into the first trial).
    """
    if configured is not None:
        return configured
    fits = [
        math.floor(float(cluster.get(key, 0.0)) / need + 1e-9) for key, need in per_trial.items() if need > 0
    ]
    n = min(fits) if fits else 1
    if n < 1:
        log.warning(
            "one trial needs %s but the cluster has %s now; running 1 trial at a time "
            "(set sweep.max_concurrent_trials to choose)",
            dict(per_trial),
            {k: cluster.get(k, 0.0) for k in per_trial},
        )
        return 1
    return n


def sweep_dir(config: VoltaConfig) -> Path:
    """Local folder of the sweep's outputs: ``<storage.path>/<sweep.name>`` for local storage, else
    ``<train.output_dir>/<sweep.name>`` (the best recipe is written there).
    """
    if config.storage.path.startswith("s3://"):
        return Path(config.train.output_dir).expanduser().resolve() / config.sweep.name
    return Path(config.storage.path).expanduser().resolve() / config.sweep.name


def summarize(config: VoltaConfig, results: Any, steps: int) -> dict[str, Any]:
    """A JSON-ready summary of a finished ResultGrid: every trial (values, last step, metric, status) and the
    best one by ``sweep.metric``/``sweep.mode`` over each trial's last report (``best`` is None when no trial
    reported the metric).
    """
    sweep = config.sweep
    trials: list[dict[str, Any]] = []
    for result in results:
        metrics = result.metrics or {}
        run_name = Path(str(result.path)).name
        value = metrics.get(sweep.metric)
        step = metrics.get("step")
        if result.error is not None:
            status = "error"
        elif step is not None and int(step) >= steps:
            status = "finished"
        else:
            status = "early_stopped"
        trials.append(
            {
                "trial_id": metrics.get("trial_id") or run_name.removeprefix(f"{sweep.name}-"),
                "run_name": run_name,
                "status": status,
                "step": int(step) if step is not None else None,
                "metric": float(value) if isinstance(value, (int, float)) else None,
                "values": {k: plain_value(v) for k, v in (result.config or {}).items()},
                "checkpoint": metrics.get("checkpoint_path"),
                "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}",
            }
        )
    scored = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    best = None
    if scored:
        pick = max if sweep.mode == "max" else min
        best = pick(scored, key=lambda t: t["metric"])
    trials.sort(key=lambda t: t["run_name"])
    return {
        "sweep": sweep.name,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "steps": steps,
        "trials": trials,
        "counts": {s: sum(t["status"] == s for t in trials) for s in ("finished", "early_stopped", "error")},
        "best": best,
    }
