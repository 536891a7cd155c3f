"""Sweep driver: ``ray job submit -- python orchestration/sweep.py --config configs/sweep-demo.yaml``.

Ray Tune over any dotted config field (GOT weights, fusion depth, learning rate, ...). A sweep recipe is a full
volta recipe plus its ``sweep:`` section. Each trial is one real pre-training run: a Tune function trainable
applies the sampled values to the base recipe, names the run after the trial id and fits one TorchTrainer from
:func:`orchestration.pretrain.build_trainer`, whose reports reach Tune through a report callback (the Train V2
pattern). ASHA stops weak trials early; the search is Optuna TPE, random or grid. Running the same command again
resumes an interrupted sweep. At the end the best trial is written out as a ready-to-run pre-training recipe and
a JSON summary is printed; with ``tracking.uri`` set the trials are grouped under one sweep run in MLflow.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestration.pretrain import PreflightError, build_trainer, preflight, storage_target
from volta.config import (
    ConfigError,
    SearchDim,
    SweepConfig,
    VoltaConfig,
    config_from_dict,
    dump_config,
    load_config,
    resolve_local_paths,
    total_steps,
)

log = logging.getLogger("volta.sweep")

__all__ = [
    "TRIAL_DRIVER_RESOURCES",
    "SweepError",
    "SweepReportCallback",
    "apply_values",
    "best_recipe",
    "build_tuner",
    "cli",
    "init_local_ray",
    "main",
    "max_concurrent_trials",
    "per_trial_resources",
    "record_sweep",
    "run_trial",
    "search_space",
    "summarize",
    "sweep_dir",
    "trial_config",
    "trial_run_name",
    "trial_storage_path",
    "validate_sweep",
    "write_best_recipe",
]

# What the trial's own function holds: no CPU (its Train workers request their own, so trials pack exactly
# by worker demand even on a 2-core machine) but a non-empty bundle, which Tune requires.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0.0, "memory": float(256 * 2**20)}
# A trial id that stands in for real ones when checking that every trial's recipe will validate.
_PROBE_TRIAL_ID = "00000000_00000"
# Largest grid over an integer range; beyond it a grid is almost certainly a typo.
_MAX_INT_GRID = 1000


class SweepError(Exception):
    """A sweep recipe problem a user can fix: one line naming the field, exit status 2."""


# ------------------------------------------------------------------------------------------- search space
def _int_bounds(where: str, dim: SearchDim) -> tuple[int, int]:
    assert dim.low is not None and dim.high is not None  # guaranteed by SearchDim validation
    if not (float(dim.low).is_integer() and float(dim.high).is_integer()):
        raise SweepError(f"{where}: type 'int' needs whole-number low/high, got {dim.low}..{dim.high}")
    return int(dim.low), int(dim.high)


def _domain(path: str, dim: SearchDim, algorithm: str) -> Any:
    where = f"sweep.space.{path}"
    grid = algorithm == "grid"
    if dim.type == "int":
        low, high = _int_bounds(where, dim)
        if grid:
            if high - low + 1 > _MAX_INT_GRID:
                raise SweepError(f"{where}: a grid over {high - low + 1} integers (max {_MAX_INT_GRID})")
            return tune.grid_search(list(range(low, high + 1)))
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive, the recipe's inclusive
    if dim.type == "choice":
        values = list(dim.values or [])
        if algorithm == "optuna" and not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise SweepError(f"{where}: Optuna choices must be numbers, strings or booleans, got {values}")
        return tune.grid_search(values) if grid else tune.choice(values)
    if grid:
        raise SweepError(
            f"{where}: a continuous '{dim.type}' dimension cannot be gridded; "
            "use type 'choice' with values, type 'int', or sweep.algorithm optuna/random"
        )
    assert dim.low is not None and dim.high is not None
    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param space for ``sweep.space``: one domain per dotted field (grid_search lists for ``grid``).

    ``uniform``/``loguniform`` map to continuous domains, ``int`` to integers with an inclusive ``high``,
    ``choice`` to a categorical; ``grid`` accepts only ``choice`` and ``int`` dimensions. Raises SweepError.
    """
    if not sweep.space:
        raise SweepError(
            "sweep.space: empty; add at least one dimension (dotted field: {type, low, high|values})"
        )
    return {path: _domain(path, dim, sweep.algorithm) for path, dim in sweep.space.items()}


def _corner_values(dim: SearchDim) -> list[Any]:
    if dim.type == "choice":
        return list(dim.values or [])
    assert dim.low is not None and dim.high is not None
    if dim.type == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


def validate_sweep(config: VoltaConfig, steps: int | None = None) -> None:
    """Check a sweep recipe before any Ray work: the space translates, every dimension's extreme values give a
    valid recipe, the metric will be reported, and ``sweep.grace_period`` fits the run length ``steps``.

    Raises SweepError with one line naming the field.
    """
    sweep = config.sweep
    search_space(sweep)
    if sweep.metric.startswith("val/") and config.train.val_every is None:
        raise SweepError(
            f"sweep.metric: {sweep.metric!r} is a validation metric but train.val_every is not set"
        )
    if steps is not None and sweep.grace_period > steps:
        raise SweepError(
            f"sweep.grace_period: {sweep.grace_period} steps is longer than the run ({steps} steps)"
        )
    base = config.model_dump(mode="json")
    for path, dim in sweep.space.items():
        for value in _corner_values(dim):
            try:
                trial_config(base, {path: value}, _PROBE_TRIAL_ID)
            except ConfigError as err:
                raise SweepError(
                    f"sweep.space.{path}: value {value!r} gives an invalid recipe: {err}"
                ) from None


# ----------------------------------------------------------------------------------------------- trials
def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The ``ray.run_name`` (and Tune trial name) of a trial: stable across driver restarts, never a timestamp."""
    return f"{sweep_name}-{trial_id}"


def trial_storage_path(storage_path: str, sweep_name: str) -> str:
    """Where a trial's Train runs keep their checkpoints: ``<storage.path>/<sweep.name>/runs`` (local or s3://)."""
    return f"{storage_path.rstrip('/')}/{sweep_name}/runs"


def _plain(value: Any) -> Any:
    """Numpy scalars (Tune samples them) as plain Python values, so validation and YAML see ints and floats."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the recipe mapping ``base`` with each dotted field of ``values`` set (types kept)."""
    data = copy.deepcopy(dict(base))
    for dotted, value in values.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = _plain(value)
    return data


def trial_config(base: Mapping[str, Any], values: Mapping[str, Any], trial_id: str) -> VoltaConfig:
    """The validated recipe of one trial: ``base`` with the sampled ``values``, its run named after the trial id,
    its checkpoints under the sweep's storage prefix and its tracker run tagged with the sweep and trial id.
    """
    data = apply_values(base, values)
    sweep = data.get("sweep") or {}
    name = str(sweep.get("name", SweepConfig().name))
    data.setdefault("ray", {})["run_name"] = trial_run_name(name, trial_id)
    storage = data.setdefault("storage", {})
    storage["path"] = trial_storage_path(str(storage.get("path", "runs/ray")), name)
    tracking = data.setdefault("tracking", {})
    tracking["tags"] = {
        **(tracking.get("tags") or {}),
        "volta.sweep": name,
        "volta.trial_id": trial_id,
        "volta.sweep_dims": ",".join(sorted((sweep.get("space") or {}).keys())),
    }
    return config_from_dict(data)


class SweepReportCallback(TuneReportCallback):  # type: ignore[misc]
    """Forwards Train reports to Tune, carrying the sweep metric forward between the steps that compute it.

    Validation metrics arrive only every ``train.val_every`` steps, while Tune rejects results without the
    sweep metric: reports before the first value are held back, later ones repeat the latest value.
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric
        self.latest: float | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Called by Ray Train on the controller after every report of the workers."""
        if not metrics:
            return
        first = dict(metrics[0])
        value = first.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            self.latest = float(value)
        elif self.latest is None:
            return
        else:
            first[self.metric] = self.latest
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def _with_callbacks(trainer: Any, callbacks: list[Any]) -> Any:
    # build_trainer owns the RunConfig; Ray reads run_config.callbacks only when fit() starts, and the trainer's
    # run context holds the same RunConfig object, so appending here is what RunConfig(callbacks=...) would do.
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), *callbacks]
    return trainer


def run_trial(
    values: dict[str, Any], base: dict[str, Any], build: Callable[[VoltaConfig], Any] = build_trainer
) -> None:
    """Tune function trainable: fit one pre-training run (``build(config)``, a TorchTrainer) for sampled ``values``.

    Metrics reach Tune through :class:`SweepReportCallback`; a resumed trial (same trial id, hence the same run
    name and storage path) continues its Train run from the latest checkpoint.
    """
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, values, trial_id)
    log.info("trial %s: %s", config.ray.run_name, json.dumps({k: _plain(v) for k, v in values.items()}))
    trainer = _with_callbacks(build(config), [SweepReportCallback(config.sweep.metric)])
    trainer.fit()


class _TrialNamer:
    """Tune trial (and trial folder) names from trial ids; a class so the Tuner's state can be pickled."""

    def __init__(self, sweep_name: str) -> None:
        self.sweep_name = sweep_name

    def __call__(self, trial: Any) -> str:
        return trial_run_name(self.sweep_name, trial.trial_id)


# -------------------------------------------------------------------------------------------- resources
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


# -------------------------------------------------------------------------------------------------- tuner
def _experiment_path(config: VoltaConfig) -> tuple[str, Any]:
    storage_path, fs = storage_target(config)
    return f"{storage_path.rstrip('/')}/{config.sweep.name}", fs


def build_tuner(
    config: VoltaConfig,
    steps: int,
    cluster: Mapping[str, float],
    build: Callable[[VoltaConfig], Any] | None = None,
) -> tuple[Any, bool]:
    """The Tuner of this sweep and whether it resumes an earlier one (``Tuner.restore`` when the experiment
    exists under ``<storage.path>/<sweep.name>``). ``steps`` is each run's length, ASHA's time horizon;
    ``build`` makes each trial's TorchTrainer (default :func:`orchestration.pretrain.build_trainer`).
    """
    sweep = config.sweep
    base = config.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, build=build or build_trainer), dict(TRIAL_DRIVER_RESOURCES)
    )
    exp_path, fs = _experiment_path(config)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        log.info("resuming sweep %r from %s", sweep.name, exp_path)
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
        return tuner, True

    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search_alg: Any
    if sweep.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=config.train.seed)
    # A grid visits every combination once; repeating it would rerun identical trials.
    num_samples = 1 if sweep.algorithm == "grid" else sweep.num_samples
    concurrent = max_concurrent_trials(cluster, per_trial_resources(config), sweep.max_concurrent_trials)
    if sweep.algorithm != "optuna":
        # Tune applies TuneConfig.max_concurrent_trials only to Searchers; the variant generator takes its own.
        search_alg = BasicVariantGenerator(random_state=config.train.seed, max_concurrent=concurrent)
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=steps,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
    )
    log.info(
        "sweep %r: %s search, %s trials, %d at a time, ASHA on %s (%s) over %d steps",
        sweep.name,
        sweep.algorithm,
        "grid" if sweep.algorithm == "grid" else num_samples,
        concurrent,
        sweep.metric,
        sweep.mode,
        steps,
    )
    namer = _TrialNamer(sweep.name)
    storage_path, _ = storage_target(config)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=concurrent if sweep.algorithm == "optuna" else None,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            # Train restarts failed workers itself (ray.max_failures); a trial that still fails is reported.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner, False


# ----------------------------------------------------------------------------------------------- results
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
                "values": {k: _plain(v) for k, v in (result.config or {}).items()},
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


def best_recipe(base: Mapping[str, Any], values: Mapping[str, Any]) -> VoltaConfig:
    """The ready-to-run pre-training recipe of the best trial: ``base`` with its values applied, the ``sweep``
    section reset to defaults and ``ray.run_name`` set to ``<sweep.name>-best`` (a fresh run, not a trial's).
    """
    data = apply_values(base, values)
    name = str((data.get("sweep") or {}).get("name", SweepConfig().name))
    data["sweep"] = SweepConfig().model_dump(mode="json")
    data.setdefault("ray", {})["run_name"] = f"{name}-best"
    return config_from_dict(data)


def write_best_recipe(config: VoltaConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML to ``path`` and check that it loads back as a valid recipe; return the path."""
    out = Path(path)
    dump_config(config, out)
    load_config(out)  # raises ConfigError if the written recipe would not run
    return out


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
    exp = client.get_experiment_by_name(config.tracking.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(config.tracking.experiment)
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


# ------------------------------------------------------------------------------------------- local Ray
def init_local_ray(num_cpus: int | None = None) -> str:
    """Start a local Ray cluster for a sweep (dashboard on 127.0.0.1) and return its GCS address.

    Ray Train frees an early-stopped trial's workers through the State API, which its actors find by address
    ("auto"); with several Ray clusters on one machine that lookup fails and the workers' CPUs leak. So the GCS
    port is chosen up front and every actor of the job gets ``RAY_ADDRESS`` pointing at this cluster.
    """
    import socket

    import ray
    from ray.util import get_node_ip_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    address = f"{get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": {"RAY_ADDRESS": address}},
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    actual = str(ray.get_runtime_context().gcs_address)
    if actual != address:
        log.warning("local Ray came up at %s, not %s; early-stopped trials may hold CPUs", actual, address)
    return actual


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of the sweep driver."""
    p = argparse.ArgumentParser(prog="volta-sweep", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", "-c", required=True, help="sweep recipe YAML (a full recipe plus `sweep:`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--check", action="store_true", help="validate recipe, space and preflight only; start nothing"
    )
    return p.parse_args(argv)


def _validated(args: argparse.Namespace) -> tuple[VoltaConfig, VoltaConfig, int]:
    """The recipe as written (the best recipe keeps its paths portable), the recipe the trials run (local paths
    absolute: Ray workers run in their own folders) and the run length in steps.
    """
    from volta.data.factory import samples_per_epoch

    recipe = load_config(args.config, args.overrides)
    validate_sweep(recipe)
    config = resolve_local_paths(recipe)
    preflight(config)
    steps = total_steps(config, samples_per_epoch(config))
    validate_sweep(config, steps)
    return recipe, config, steps


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, preflight, sweep, write the best recipe; returns the exit status (0 success, 2 bad recipe or
    preflight, 1 the sweep failed or no trial reported the metric).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe, config, steps = _validated(args)
    except (ConfigError, SweepError) as err:
        print(f"volta-sweep: config error: {err}", file=sys.stderr)
        return 2
    except PreflightError as err:
        print(f"volta-sweep: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(f"volta-sweep: {args.config}: sweep valid, storage and shards reachable", file=sys.stderr)
        return 0
    import ray

    if not ray.is_initialized():
        if config.ray.address:
            ray.init(address=config.ray.address)
        else:
            # The dashboard serves the State API that Ray Train uses to free early-stopped trials' workers.
            init_local_ray()
    started = time.monotonic()
    try:
        if config.tracking.uri:
            # Created once here: trials starting together would otherwise race to create it.
            from orchestration.tracking import ensure_experiment

            ensure_experiment(config.tracking.uri, config.tracking.experiment)
        tuner, resumed = build_tuner(config, steps, ray.cluster_resources())
        results = tuner.fit()
    except Exception as err:
        print(f"volta-sweep: sweep failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = summarize(config, results, steps)
    summary["resumed"] = resumed
    summary["duration_s"] = round(time.monotonic() - started, 1)
    best = summary["best"]
    best_path: Path | None = None
    if best is not None:
        best_path = write_best_recipe(
            best_recipe(recipe.model_dump(mode="json"), best["values"]),
            sweep_dir(config) / "best-recipe.yaml",
        )
        summary["best_recipe"] = str(best_path)
    try:
        summary["tracking_run_id"] = record_sweep(config, summary, best_path)
    except Exception as err:  # the dashboard is a view; the sweep's result stands without it
        log.warning("could not record the sweep in %s: %s", config.tracking.uri, err)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    if best is None:
        print(f"volta-sweep: no trial reported {config.sweep.metric!r}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console-script entry point (``volta-sweep``)."""
    raise SystemExit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
