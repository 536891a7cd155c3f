"""Experiment tracking for the dashboard: one MLflow run per pre-training run (or sweep trial), rank 0 only.

Tracking is optional: with ``tracking.uri`` unset nothing is logged. A resumed run (same ``ray.run_name``) continues
logging into the MLflow run it started, found by its ``volta.run_name`` tag.

Tracking is best-effort: no call of :class:`Tracker` raises because the server is down, slow or answers with an
error. Metric points wait in a bounded buffer and are sent in order when the server answers again; artifacts wait
in a bounded list; what does not fit is dropped and counted. A down server is tried again on a backoff schedule,
so a training step costs no request while it waits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from volta.config import VoltaConfig

log = logging.getLogger(__name__)

# MLflow's own defaults (7 HTTP retries with exponential backoff, 120 s timeout) stall a training step for minutes
# while the server is down. The tracker retries on its own schedule with everything buffered, so one request
# should give up sooner: one retry (a transient 5xx), and a 30 s timeout: a stopped server refuses at once, while
# a busy one (a sweep's trials all starting together) may take seconds to answer and is not down. Measured: with
# a 5 s timeout, trials of a loaded 2-core CI machine lost their MLflow runs. Set by Tracker.start in the process
# that tracks (rank 0), only where unset.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# MLflow's limit on metrics per log_batch request.
BATCH_METRICS = 1000


@dataclass(frozen=True)
class TrackingLimits:
    """How much a tracker keeps while its server is away, how often it tries again and how long it tries at the
    end: the first retry ``retry_first_s`` after a failure, the gap doubling up to ``retry_max_s``.
    """

    max_buffered_metrics: int = 10_000
    max_pending_artifacts: int = 100
    artifact_tries: int = 3
    retry_first_s: float = 5.0
    retry_max_s: float = 60.0
    finish_deadline_s: float = 60.0


@dataclass(frozen=True)
class RunSpec:
    """The MLflow run a tracker writes to: on the server at ``uri``, found in ``experiment`` by its
    ``volta.run_name`` tag, else created with ``tags`` and ``params``.
    """

    uri: str
    experiment: str
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


class _Point(NamedTuple):
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass
class _Artifact:
    path: str
    artifact_path: str | None
    tries: int = 0


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


def set_mlflow_http_defaults() -> None:
    """Make MLflow's HTTP requests in this process fail fast (:data:`MLFLOW_HTTP_DEFAULTS`) unless set already."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def _rejected(err: BaseException) -> bool:
    """Whether the server answered and refused the request itself (a bad metric), so sending it again is futile."""
    from mlflow.exceptions import RestException

    return isinstance(err, RestException) and err.get_http_status_code() == 400


class Tracker:
    """A best-effort MLflow client for one run: params once, metrics per step, artifacts, finish.

    Every call returns normally whatever the server does. While the server fails, metric points are buffered
    (the oldest dropped beyond ``limits.max_buffered_metrics``) and artifacts kept for upload; the run is opened,
    the buffer sent in order and the artifacts uploaded at the first call that reaches the server again.
    ``dropped_metrics``, ``dropped_artifacts``, ``failed_calls`` and ``sent_metrics`` count what happened.
    """

    def __init__(
        self,
        client: Any,
        spec: RunSpec,
        *,
        limits: TrackingLimits = TrackingLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.spec = spec
        self.limits = limits
        self.run_id: str | None = None
        self.dropped_metrics = 0
        self.dropped_artifacts = 0
        self.failed_calls = 0
        self.sent_metrics = 0
        self._clock = clock
        self._metrics: deque[_Point] = deque()
        self._artifacts: deque[_Artifact] = deque()
        self._params_due = False
        self._down = False
        self._sent_before_outage = 0
        self._warned_rejected = False
        self._retry_s = limits.retry_first_s
        self._next_try = -math.inf

    @classmethod
    def start(
        cls,
        config: VoltaConfig,
        *,
        extra_tags: dict[str, str] | None = None,
        limits: TrackingLimits = TrackingLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> Tracker | None:
        """Open (or reopen) this run's MLflow run; None when tracking is off. A server that does not answer
        leaves the run to be opened by a later call; this never raises for the server.
        """
        if not config.tracking.uri:
            return None
        set_mlflow_http_defaults()
        from mlflow.tracking import MlflowClient

        name = config.ray.run_name
        spec = RunSpec(
            uri=config.tracking.uri,
            experiment=config.tracking.experiment,
            name=name,
            tags={
                "volta.run_name": name,
                "mlflow.runName": name,
                **config.tracking.tags,
                **(extra_tags or {}),
            },
            params=flat_params(config),
        )
        try:
            client = MlflowClient(tracking_uri=spec.uri)
        except Exception as err:  # an unusable URI: training goes on untracked
            log.warning("tracking off: cannot use tracking.uri %s (%s)", spec.uri, _one_line(err))
            return None
        tracker = cls(client, spec, limits=limits, clock=clock)
        tracker._contact()
        return tracker

    @property
    def buffered_metrics(self) -> int:
        """Metric points waiting for the server."""
        return len(self._metrics)

    @property
    def up(self) -> bool:
        """Whether the last contact with the server succeeded."""
        return not self._down

    def counters(self) -> dict[str, float]:
        """The tracker's own health as metrics (``tracking/*``), for the run's metrics file and reports."""
        return {
            "tracking/buffered_metrics": float(len(self._metrics)),
            "tracking/dropped_metrics": float(self.dropped_metrics),
            "tracking/dropped_artifacts": float(self.dropped_artifacts),
            "tracking/failed_calls": float(self.failed_calls),
        }

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log the finite numeric metrics of one step (sent now, or buffered while the server is away)."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                if len(self._metrics) >= self.limits.max_buffered_metrics:
                    self._metrics.popleft()
                    self.dropped_metrics += 1
                self._metrics.append(_Point(key, float(value), now, step))
        self._contact_if_due()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a file (heat maps, loss curve) to the run, now or once the server answers again (the file must
        still exist then).
        """
        if len(self._artifacts) >= self.limits.max_pending_artifacts:
            self._artifacts.popleft()
            self.dropped_artifacts += 1
        self._artifacts.append(_Artifact(path, artifact_path))
        self._contact_if_due()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what waits and mark the run ended, trying for up to ``limits.finish_deadline_s``; never raises."""
        deadline = time.monotonic() + self.limits.finish_deadline_s
        while not self._contact(status=status):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "tracking: gave up at finish; %d metric points and %d artifacts not sent",
                    len(self._metrics),
                    len(self._artifacts),
                )
                return
            time.sleep(min(1.0, left))

    # ------------------------------------------------------------------------------------------- server contact
    def _contact_if_due(self) -> None:
        if self._clock() >= self._next_try:
            self._contact()

    def _contact(self, *, status: str | None = None) -> bool:
        """Open the run if needed, send the buffered metrics, upload pending artifacts and (``status``) end the
        run; on any failure count it, warn once per outage, schedule the next try and return False.
        """
        try:
            self._open_run()
            self._send_metrics()
            self._upload_artifacts()
            if status is not None:
                self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self.failed_calls += 1
            self._next_try = self._clock() + self._retry_s
            self._retry_s = min(2 * self._retry_s, self.limits.retry_max_s)
            if not self._down:
                self._down = True
                self._sent_before_outage = self.sent_metrics
                log.warning(
                    "tracking at %s failed (%s); buffering up to %d metric points, retrying every %.0f-%.0f s",
                    self.spec.uri,
                    _one_line(err),
                    self.limits.max_buffered_metrics,
                    self.limits.retry_first_s,
                    self.limits.retry_max_s,
                )
            return False
        if self._down:
            self._down = False
            log.info("tracking back: sent %d buffered metrics", self.sent_metrics - self._sent_before_outage)
        self._retry_s = self.limits.retry_first_s
        self._next_try = -math.inf
        return True

    def _open_run(self) -> None:
        if self.run_id is None:
            client, spec = self.client, self.spec
            exp_id = _experiment_id(client, spec.experiment)
            found = _find_run(client, exp_id, f"tags.`volta.run_name` = '{spec.name}'")
            if found is not None:
                client.update_run(found.info.run_id, status="RUNNING")
                self.run_id = str(found.info.run_id)
            else:
                self.run_id = str(client.create_run(exp_id, tags=spec.tags, run_name=spec.name).info.run_id)
                self._params_due = True
            log.info("tracking run %s in experiment %r at %s", self.run_id, spec.experiment, spec.uri)
        if self._params_due:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in self.spec.params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
            self._params_due = False

    def _send_metrics(self) -> None:
        from mlflow.entities import Metric

        while self._metrics:
            batch = [self._metrics[i] for i in range(min(BATCH_METRICS, len(self._metrics)))]
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch])
            except Exception as err:
                if not _rejected(err):
                    raise
                # The server refuses these points (e.g. a bad name): sending them again would stall the buffer.
                self.failed_calls += 1
                self.dropped_metrics += len(batch)
                if not self._warned_rejected:
                    self._warned_rejected = True
                    log.warning(
                        "tracking server rejected %d metric points, dropped: %s", len(batch), _one_line(err)
                    )
            else:
                self.sent_metrics += len(batch)
            for _ in batch:
                self._metrics.popleft()

    def _upload_artifacts(self) -> None:
        while self._artifacts:
            item = self._artifacts[0]
            if not Path(item.path).is_file():
                log.warning("tracking: %s is gone, not uploaded", item.path)
                self._artifacts.popleft()
                self.dropped_artifacts += 1
                continue
            try:
                self.client.log_artifact(self.run_id, item.path, item.artifact_path)
            except Exception:
                item.tries += 1
                if item.tries >= self.limits.artifact_tries:
                    self._artifacts.popleft()
                    self.dropped_artifacts += 1
                raise
            self._artifacts.popleft()


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
