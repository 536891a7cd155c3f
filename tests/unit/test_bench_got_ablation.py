"""bench.got_ablation: an arm's last validation is read back from an earlier run instead of retrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.got_ablation import main, run


def _write(out: Path, arm: str, rows: list[dict[str, float]]) -> None:
    (out / f"ablation-{arm}").mkdir(parents=True)
    (out / f"ablation-{arm}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reads_both_arms_and_reports_the_last_validation(tmp_path: Path, capsys) -> None:
    base = {"val/grounding_random": 0.1, "val/i2t_r1": 0.2}
    _write(
        tmp_path,
        "got_default",
        [
            {"step": 100, "val/grounding_acc": 0.9, **base},
            {"step": 150, "train/loss": 1.0},
            {"step": 200, "val/grounding_acc": 0.5, **base},
        ],
    )
    _write(tmp_path, "got_zero", [{"step": 200, "val/grounding_acc": 0.3, **base}])
    out = run("unused.yaml", [], str(tmp_path), arms=())
    assert out["got_default"]["step"] == 200 and out["got_default"]["val/grounding_acc"] == 0.5
    assert out["pointing_gain_points"] == pytest.approx(20.0)
    assert out["default_over_random"] == pytest.approx(5.0)
    assert main(["--only", "none", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["pointing_gain_points"] == pytest.approx(20.0)


def test_an_arm_without_validation_metrics_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "got_default", [{"step": 10, "train/loss": 1.0}])
    _write(tmp_path, "got_zero", [{"step": 200, "val/grounding_acc": 0.3, "val/grounding_random": 0.1}])
    with pytest.raises(RuntimeError, match="no validation metrics"):
        run("unused.yaml", [], str(tmp_path), arms=())
