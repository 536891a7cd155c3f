"""bench.alignment end to end: two real (debug-size) training runs, the table, and a resumed study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.alignment import main
from tests.fixtures_pretrain import DEBUG, synth_data

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_study_trains_each_arm_then_reuses_finished_runs(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    args = ["--config", str(DEBUG), "--dataset", f"shapes={synth_data}", "--arm", "recipe", "--arm", "got_off",
            "--seeds", "3", "--jobs", "2", "--out", str(out),
            "--set", "train.max_steps=2", "--set", "train.val_every=2", "--set", "train.device=cpu",
            "--set", "data.num_workers=0", "--set", "eval.heatmap_samples=0"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "study.json").read_text())
    assert [(r["arm"], r["dataset"], r["seed"]) for r in results] == [
        ("recipe", "shapes", 3),
        ("got_off", "shapes", 3),
    ]
    for r in results:
        config = (out / f"{r['arm']}-shapes-s3" / "final" / "config.yaml").read_text()
        assert "seed: 3" in config
        assert "val/grounding_acc" in r["metrics"] and "val/local_i2t_r10" in r["metrics"]
        assert all(isinstance(m, str) for m in r["misses"])
    assert results[1]["overrides"] == ["loss.got.weight=0"]
    printed = capsys.readouterr().out
    assert "| recipe | shapes | 3 |" in printed and "| got_off | shapes | 3 |" in printed

    # Extended by a seed: the finished runs are read back, only the new seed's two runs train.
    logs = {p.name: p.stat().st_mtime_ns for p in out.glob("*.log")}
    assert main([*args[: args.index("--seeds")], "--seeds", "3", "4", *args[args.index("--jobs") :]]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-s3.log")} == logs
    assert len(json.loads((out / "study.json").read_text())) == 4

    # The same run names with another setting: refused before any training, naming the setting.
    capsys.readouterr()
    assert main([*args, "--set", "loss.got.contrastive.weight=0.5"]) == 2
    err = capsys.readouterr().err
    assert "recipe-shapes-s3: loss.got.contrastive.weight" in err and "--out" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-s3.log")} == logs


def test_bad_arm_or_dataset_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dataset", f"x={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["--arm", "bad arm", "--out", str(tmp_path / "o")]) == 2
    assert "--arm" in capsys.readouterr().err
