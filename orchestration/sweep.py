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
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestration.cluster import connect_ray, usage_exit
from orchestration.pretrain import PreflightError, build_trainer, preflight, storage_target
from orchestration.sweep_results import (
    TRIAL_DRIVER_RESOURCES,
    max_concurrent_trials,
    per_trial_resources,
    summarize,
    sweep_dir,
)
from orchestration.sweep_space import (
    SweepError,
    apply_values,
    best_recipe,
    plain_value,
    search_space,
    trial_config,
    trial_run_name,
    trial_storage_path,
    validate_sweep,
    write_best_recipe,
)
from orchestration.tracking import record_sweep
from volta.config import (
    ConfigError,
    VoltaConfig,
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
    "main",
    "max_concurrent_trials",
    "per_trial_resources",
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
    log.info("trial %s: %s", config.ray.run_name, json.dumps({k: plain_value(v) for k, v in values.items()}))
    trainer = _with_callbacks(build(config), [SweepReportCallback(config.sweep.metric)])
    trainer.fit()


class _TrialNamer:
    """Tune trial (and trial folder) names from trial ids; a class so the Tuner's state can be pickled."""

    def __init__(self, sweep_name: str) -> None:
        self.sweep_name = sweep_name

    def __call__(self, trial: Any) -> str:
        return trial_run_name(self.sweep_name, trial.trial_id)


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
    except (ConfigError, PreflightError) as err:
        return usage_exit("volta-sweep", err)
    if args.check:
        print(f"volta-sweep: {args.config}: sweep valid, storage and shards reachable", file=sys.stderr)
        return 0
    import ray

    # The dashboard serves the State API that Ray Train uses to free early-stopped trials' workers.
    connect_ray(config.ray.address, dashboard=True)
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
