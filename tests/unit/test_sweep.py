"""Sweep driver pieces without a cluster: search-space translation, trial recipes, best recipe, concurrency."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.sample import Categorical, Float, Integer

from orchestration import sweep as sw
from tests.conftest import REPO
from volta.config import ConfigError, SweepConfig, VoltaConfig, load_config

DEMO = REPO / "configs" / "sweep-demo.yaml"


def _sweep(**space: Any) -> SweepConfig:
    return SweepConfig.model_validate({"space": space})


def _demo(*overrides: str) -> VoltaConfig:
    return load_config(DEMO, list(overrides))


# ------------------------------------------------------------------------------------------- search space
def test_each_dimension_type_becomes_the_matching_tune_domain() -> None:
    space = sw.search_space(
        _sweep(
            **{
                "loss.got.wd_weight": {"type": "uniform", "low": 0.1, "high": 0.5},
                "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                "model.fusion_depth": {"type": "int", "low": 1, "high": 3},
                "loss.got.prune_scope": {"type": "choice", "values": ["sample", "batch"]},
            }
        )
    )
    wd, lr, depth, scope = (
        space["loss.got.wd_weight"],
        space["optim.lr"],
        space["model.fusion_depth"],
        space["loss.got.prune_scope"],
    )
    assert isinstance(wd, Float) and (wd.lower, wd.upper) == (0.1, 0.5)
    assert type(wd.get_sampler()).__name__ == "_Uniform"
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert type(lr.get_sampler()).__name__ == "_LogUniform"
    # The recipe's high is inclusive; Tune's randint upper bound is exclusive.
    assert isinstance(depth, Integer) and (depth.lower, depth.upper) == (1, 4)
    assert {depth.sample() for _ in range(200)} == {1, 2, 3}
    assert isinstance(scope, Categorical) and scope.categories == ["sample", "batch"]


def test_grid_expands_choices_and_int_ranges() -> None:
    sweep = SweepConfig.model_validate(
        {
            "algorithm": "grid",
            "space": {
                "model.fusion_depth": {"type": "int", "low": 2, "high": 4},
                "loss.got.weight": {"type": "choice", "values": [1.0, 10.0]},
            },
        }
    )
    space = sw.search_space(sweep)
    assert space["model.fusion_depth"] == tune.grid_search([2, 3, 4])
    assert space["loss.got.weight"] == tune.grid_search([1.0, 10.0])


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_grid_rejects_continuous_dimensions_naming_the_field(kind: str) -> None:
    sweep = SweepConfig.model_validate(
        {"algorithm": "grid", "space": {"loss.got.wd_weight": {"type": kind, "low": 0.1, "high": 1.0}}}
    )
    with pytest.raises(
        sw.SweepError, match=r"sweep\.space\.loss\.got\.wd_weight: a continuous .* cannot be gridded"
    ):
        sw.search_space(sweep)


def test_invalid_dimensions_are_rejected() -> None:
    with pytest.raises(sw.SweepError, match="sweep.space: empty"):
        sw.search_space(SweepConfig())
    with pytest.raises(sw.SweepError, match=r"model\.fusion_depth: type 'int' needs whole-number"):
        sw.search_space(_sweep(**{"model.fusion_depth": {"type": "int", "low": 1.5, "high": 3}}))
    with pytest.raises(sw.SweepError, match="Optuna choices must be numbers"):
        sw.search_space(_sweep(**{"model.image.timm_kwargs": {"type": "choice", "values": [{"a": 1}]}}))
    # Unknown dotted paths never get this far: the config itself rejects them.
    with pytest.raises(ConfigError, match=r"sweep\.space\.loss\.nope: is not a config field"):
        _demo("sweep.space.loss.nope={type: uniform, low: 0, high: 1}")


def test_validate_sweep_checks_every_value_metric_and_grace_period() -> None:
    sw.validate_sweep(_demo(), steps=8)
    with pytest.raises(sw.SweepError, match=r"model\.fusion_depth: value 9 gives an invalid recipe"):
        sw.validate_sweep(_demo("sweep.space.model.fusion_depth={type: choice, values: [1, 9]}"))
    with pytest.raises(sw.SweepError, match="train.val_every is not set"):
        sw.validate_sweep(_demo("sweep.metric=val/grounding_acc", "train.val_every=null"))
    with pytest.raises(sw.SweepError, match="sweep.grace_period: 2 steps is longer than the run"):
        sw.validate_sweep(_demo(), steps=1)
    # A sweep name that cannot make run names fails before Ray, through the trial recipe check.
    with pytest.raises(sw.SweepError, match=r"ray\.run_name"):
        sw.validate_sweep(_demo("sweep.name=bad name!"))


# ---------------------------------------------------------------------------------------------- trials
def test_trial_config_applies_values_and_names_the_run_after_the_trial() -> None:
    config = _demo()
    base = config.model_dump(mode="json")
    values = {"model.fusion_depth": np.int64(1), "loss.got.weight": np.float64(12.5)}
    trial = sw.trial_config(base, values, "ab12cd34_00003")
    assert trial.model.fusion_depth == 1 and type(trial.model.fusion_depth) is int
    assert trial.loss.got.weight == 12.5
    assert trial.ray.run_name == "sweep-demo-ab12cd34_00003"
    assert trial.storage.path == "runs/sweep-demo/ray/sweep-demo/runs"
    assert trial.tracking.tags["volta.sweep"] == "sweep-demo"
    assert trial.tracking.tags["volta.trial_id"] == "ab12cd34_00003"
    assert trial.tracking.tags["volta.sweep_dims"].split(",") == sorted(config.sweep.space)
    # Everything else is the base recipe, which is left untouched.
    assert trial.loss.got.wd_weight == config.loss.got.wd_weight and trial.train == config.train
    assert base["model"]["fusion_depth"] == config.model.fusion_depth
    assert base["ray"]["run_name"] == "volta-sweep-demo"


def test_trial_storage_keeps_s3_prefixes() -> None:
    assert sw.trial_storage_path("s3://bucket/runs/", "s1") == "s3://bucket/runs/s1/runs"
    base = _demo().model_dump(mode="json")
    base["storage"]["path"] = "s3://bucket/runs"
    assert sw.trial_config(base, {}, "x_00000").storage.path == "s3://bucket/runs/sweep-demo/runs"


def test_trial_config_rejects_values_that_break_the_recipe() -> None:
    base = _demo().model_dump(mode="json")
    with pytest.raises(ConfigError, match="model.fusion_depth"):
        sw.trial_config(base, {"model.fusion_depth": 7}, "x_00000")


def test_best_recipe_is_written_validated_and_ready_to_run(tmp_path: Path) -> None:
    config = _demo()
    best = sw.best_recipe(
        config.model_dump(mode="json"), {"model.fusion_depth": 1, "loss.got.wd_weight": 0.3}
    )
    path = sw.write_best_recipe(best, tmp_path / "s" / "best-recipe.yaml")
    again = load_config(path)
    assert again == best
    assert again.model.fusion_depth == 1 and again.loss.got.wd_weight == 0.3
    assert again.sweep == SweepConfig()  # a plain pre-training recipe
    assert again.ray.run_name == "sweep-demo-best" and again.storage.path == config.storage.path
    assert again.data == config.data and again.train == config.train


def test_sweep_dir_is_under_storage_or_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sw.sweep_dir(_demo()) == tmp_path / "runs/sweep-demo/ray/sweep-demo"
    assert sw.sweep_dir(_demo("storage.path=s3://b/runs")) == tmp_path / "runs/sweep-demo/sweep-demo"


# ------------------------------------------------------------------------------------------- resources
def test_per_trial_resources_count_the_train_workers() -> None:
    cpu = sw.per_trial_resources(
        _demo("ray.num_workers=2", "ray.cpus_per_worker=1.5", "train.global_batch_size=16")
    )
    assert cpu["CPU"] == 3.0 and "GPU" not in cpu and cpu["memory"] > 0
    gpu = sw.per_trial_resources(
        _demo(
            "ray.num_workers=4",
            "ray.use_gpu=true",
            "train.device=auto",
            "ray.gpus_per_worker=1",
            "train.global_batch_size=32",
        )
    )
    assert gpu["GPU"] == 4.0 and gpu["CPU"] == 4.0


def test_max_concurrent_trials_from_cluster_resources() -> None:
    mem = 16 * 2**30
    one_cpu = {"CPU": 1.0, "memory": 2**28}
    assert sw.max_concurrent_trials({"CPU": 2.0, "memory": mem}, one_cpu) == 2
    assert sw.max_concurrent_trials({"CPU": 4.0, "memory": mem}, {"CPU": 1.5, "memory": 2**28}) == 2
    # GPUs bind first on a GPU cluster.
    assert sw.max_concurrent_trials({"CPU": 64.0, "GPU": 8.0, "memory": mem}, {"CPU": 8.0, "GPU": 4.0}) == 2
    # Fractional CPUs on a 2-core machine.
    assert sw.max_concurrent_trials({"CPU": 2.0, "memory": mem}, {"CPU": 0.5, "memory": 2**28}) == 4
    # Too small for one trial now (an autoscaler may add nodes): one at a time.
    assert sw.max_concurrent_trials({"CPU": 2.0, "memory": mem}, {"CPU": 4.0}) == 1
    assert sw.max_concurrent_trials({"CPU": 2.0}, one_cpu, configured=5) == 5


# ------------------------------------------------------------------------------------ report callback
def _callback(monkeypatch: pytest.MonkeyPatch) -> tuple[sw.SweepReportCallback, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)
    monkeypatch.setattr(
        TuneReportCallback, "after_report", lambda self, ctx, metrics, ckpt: sent.append(metrics[0])
    )
    return sw.SweepReportCallback("val/grounding_acc"), sent


def test_report_callback_holds_back_and_carries_the_sweep_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    cb, sent = _callback(monkeypatch)
    cb.after_report(None, [{"step": 1.0, "train/loss": 3.0}], None)
    assert sent == []  # nothing to rank by yet
    cb.after_report(None, [{"step": 2.0, "val/grounding_acc": 0.25}], None)
    cb.after_report(None, [{"step": 3.0, "train/loss": 2.0}], None)
    cb.after_report(None, [{"step": 4.0, "val/grounding_acc": float("nan")}], None)
    assert [m["val/grounding_acc"] for m in sent] == [0.25, 0.25, 0.25]
    assert [m["step"] for m in sent] == [2.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------ summary / CLI
def _result(name: str, step: int | None, value: float | None, error: Exception | None = None) -> Any:
    metrics: dict[str, Any] = {} if step is None else {"step": float(step), "trial_id": name[-8:]}
    if value is not None:
        metrics["train/mlm_loss"] = value
    return SimpleNamespace(
        path=f"/x/sweep-demo/{name}",
        metrics=metrics,
        error=error,
        config={"loss.got.weight": np.float64(2.0)},
    )


def test_summarize_ranks_trials_and_labels_early_stops() -> None:
    config = _demo("sweep.metric=train/mlm_loss", "sweep.mode=min")  # what the stand-in results report
    results = [
        _result("sweep-demo-a_00000", 8, 2.5),
        _result("sweep-demo-a_00001", 2, 1.0),
        _result("sweep-demo-a_00002", 8, 2.0),
        _result("sweep-demo-a_00003", None, None, RuntimeError("boom")),
    ]
    summary = sw.summarize(config, results, steps=8)
    by_name = {t["run_name"]: t for t in summary["trials"]}
    assert by_name["sweep-demo-a_00001"]["status"] == "early_stopped"
    assert (
        by_name["sweep-demo-a_00003"]["status"] == "error"
        and "boom" in by_name["sweep-demo-a_00003"]["error"]
    )
    assert summary["counts"] == {"finished": 2, "early_stopped": 1, "error": 1}
    assert summary["best"]["run_name"] == "sweep-demo-a_00001"  # mode min
    assert summary["best"]["values"] == {"loss.got.weight": 2.0}
    flipped = sw.summarize(_demo("sweep.metric=train/mlm_loss", "sweep.mode=max"), results, steps=8)
    assert flipped["best"]["run_name"] == "sweep-demo-a_00000"


def test_main_rejects_bad_sweeps_with_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert sw.main(["--config", str(DEMO), "--set", "sweep.algorithm=grid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be gridded" in err[0]
    assert sw.main(["--config", str(DEMO), "--set", "model.fusion_depth=99"]) == 2
    assert "model.fusion_depth" in capsys.readouterr().err


def test_main_runs_preflight_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = sw.main(["--config", str(DEMO), "--set", f"data.train_shards={tmp_path}/none", "--check"])
    assert code == 2
    assert "data.train_shards" in capsys.readouterr().err
