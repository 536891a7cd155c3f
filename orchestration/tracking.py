"""Experiment tracking for the dashboard: one MLflow run per pre-training run (or sweep trial), rank 0 only.

Tracking is optional: with ``tracking.uri`` unset nothing is logged. A resumed run (same ``ray.run_name``) continues
logging into the MLflow run it started, found by its ``volta.run_name`` tag.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volta.config import VoltaConfig

log = logging.getLogger(__name__)


def flat_params(config: VoltaConfig) -> dict[str, str]:
    """The config flattened to ``section.key`` strings (MLflow params), skipping the sweep space and run tags."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if (prefix == "sweep" and k == "space") or (prefix == "tracking" and k == "tags"):
                    continue
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:500]

    walk("", config.model_dump(mode="json"))
    return out


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing; a concurrent creator (another trial) is tolerated."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def ensure_experiment(uri: str, name: str) -> str:
    """Make sure experiment ``name`` exists on the tracking server at ``uri``; return its id."""
    from mlflow.tracking import MlflowClient

    return _experiment_id(MlflowClient(tracking_uri=uri), name)


class Tracker:
    """A thin MLflow client: params once, metrics per step, artifacts, finish."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, config: VoltaConfig, *, extra_tags: dict[str, str] | None = None) -> Tracker | None:
        """Open (or reopen) this run's MLflow run; None when tracking is off."""
        if not config.tracking.uri:
            return None
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=config.tracking.uri)
        exp_id = _experiment_id(client, config.tracking.experiment)
        name = config.ray.run_name
        found = client.search_runs([exp_id], filter_string=f"tags.`volta.run_name` = '{name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {
                "volta.run_name": name,
                "mlflow.runName": name,
                **config.tracking.tags,
                **(extra_tags or {}),
            }
            run_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
            params = flat_params(config)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        log.info(
            "tracking run %s in experiment %r at %s", run_id, config.tracking.experiment, config.tracking.uri
        )
        return cls(client, run_id)

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log the finite numeric metrics of one step."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a file (heat maps, loss curve) to the run."""
        self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id, status=status)


def _find_run(client: Any, exp_id: str, filter_string: str) -> Any:
    found = client.search_runs([exp_id], filter_string=filter_string, max_results=1)
    return found[0] if found else None


def record_sweep(config: VoltaConfig, summary: Mapping[str, Any], recipe: Path | None) -> str | None:
    """Group the sweep in MLflow (when ``tracking.uri`` is set): a parent run named after the sweep with the best
    result and the best recipe, each trial's run nested under it with its status, the objective and a terminal
    state (ASHA kills stopped trials before their tracker can finish). Returns the parent run id.
    """
    if not config.tracking.uri:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking.uri)
    exp_id = _experiment_id(client, config.tracking.experiment)
    name = config.sweep.name
    parent = _find_run(
        client, exp_id, f"tags.`volta.sweep` = '{name}' and tags.`volta.sweep_role` = 'parent'"
    )
    if parent is None:
        tags = {
            "volta.sweep": name,
            "volta.sweep_role": "parent",
            "mlflow.runName": name,
            **config.tracking.tags,
        }
        parent_id = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    else:
        parent_id = parent.info.run_id
    now = int(time.time() * 1000)
    sweep_tags = {
        "volta.sweep.metric": config.sweep.metric,
        "volta.sweep.mode": config.sweep.mode,
        "volta.sweep.algorithm": config.sweep.algorithm,
        "volta.sweep.space": json.dumps(config.sweep.model_dump(mode="json")["space"])[:5000],
    }
    for key, value in sweep_tags.items():
        client.set_tag(parent_id, key, value)
    best = summary.get("best")
    if best is not None:
        client.set_tag(parent_id, "volta.best_run_name", best["run_name"])
        client.set_tag(parent_id, "volta.best_values", json.dumps(best["values"])[:5000])
        items = [Metric(f"best/{config.sweep.metric}", float(best["metric"]), now, 0)]
        items += [
            Metric(f"best/{k}", float(v), now, 0)
            for k, v in best["values"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        client.log_batch(parent_id, metrics=items)
    for key, count in summary.get("counts", {}).items():
        client.log_batch(parent_id, metrics=[Metric(f"trials/{key}", float(count), now, 0)])
    for trial in summary.get("trials", []):
        run = _find_run(client, exp_id, f"tags.`volta.run_name` = '{trial['run_name']}'")
        if run is None:
            log.warning("trial %s has no MLflow run (did its worker start?)", trial["run_name"])
            continue
        run_id = run.info.run_id
        client.set_tag(run_id, "mlflow.parentRunId", parent_id)  # nests the trial under the sweep in the UI
        client.set_tag(run_id, "volta.trial_status", trial["status"])
        if trial["metric"] is not None:
            client.log_batch(
                run_id, metrics=[Metric("sweep/objective", float(trial["metric"]), now, trial["step"] or 0)]
            )
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED" if trial["status"] == "error" else "KILLED")
    if recipe is not None and recipe.is_file():
        try:
            client.log_artifact(parent_id, str(recipe))
        except Exception as err:  # an artifact store problem must not hide the sweep's result
            log.warning("could not upload %s to the tracking server: %s", recipe, err)
    client.set_terminated(parent_id, status="FINISHED")
    return str(parent_id)
