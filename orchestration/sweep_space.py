"""What a sweep searches and runs: the Tune search space of ``sweep.space``, the validated recipe of each trial,
and the best trial's recipe. Pure config work (Tune's domain constructors only): no cluster is touched."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from volta.config import (
    ConfigError,
    SearchDim,
    SweepConfig,
    VoltaConfig,
    config_from_dict,
    dump_config,
    load_config,
    set_dotted,
)

__all__ = [
    "SweepError",
    "apply_values",
    "best_recipe",
    "plain_value",
    "search_space",
    "trial_config",
    "trial_run_name",
    "trial_storage_path",
    "validate_sweep",
    "write_best_recipe",
]

# A trial id that stands in for real ones when checking that every trial's recipe will validate.
_PROBE_TRIAL_ID = "00000000_00000"
# Largest grid over an integer range; beyond it a grid is almost certainly a typo.
_MAX_INT_GRID = 1000


class SweepError(ConfigError):
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


def plain_value(value: Any) -> Any:
    """Numpy scalars (Tune samples them) as plain Python values, so validation and YAML see ints and floats."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the recipe mapping ``base`` with each dotted field of ``values`` set (types kept)."""
    data = copy.deepcopy(dict(base))
    for dotted, value in values.items():
        set_dotted(data, dotted, plain_value(value))
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
