"""`volta train`: the assembled run in one process (no Ray, no DeepSpeed), with checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_cli import volta
from tests.fixtures_pretrain import DEBUG, last_per_step, run_overrides, synth_data

pytestmark = pytest.mark.timeout(300)


def test_train_in_one_process_writes_the_run_and_resumes(synth_data: Path, tmp_path: Path) -> None:
    args = ["train", "--config", DEBUG, *run_overrides(synth_data, tmp_path, "local"),
            "--set", "train.checkpoint_every=2", "--set", "train.val_every=4",
            "--set", "eval.heatmap_samples=2", "--set", "train.device=cpu"]  # fmt: skip
    first = volta(*args, "--set", "train.max_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "local"
    assert first.stdout.strip() == str(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (run / "final" / "model.safetensors").exists() and any((run / "export").iterdir())
    assert (run / "heatmaps" / "step-00000004.png").exists()
    records = last_per_step(run / "metrics.jsonl")
    assert sorted(records) == [1, 2, 3, 4]
    assert all(records[s]["train/loss"] > 0 for s in records)
    assert any("val/" in key for key in records[4]), sorted(records[4])

    # The same command with a longer run continues after step 4: only steps 5 and 6 are new.
    lines_before = len((run / "metrics.jsonl").read_text().splitlines())
    second = volta(*args, "--set", "train.max_steps=6", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step-00000004" in second.stderr
    new = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    assert [int(r["step"]) for r in new if "train/loss" in r] == [5, 6]


def test_train_rejects_a_bad_config_in_one_line(tmp_path: Path) -> None:
    run = volta("train", "--config", DEBUG, "--set", "train.max_steps=0", cwd=tmp_path)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.max_steps" in lines[0], run.stderr
