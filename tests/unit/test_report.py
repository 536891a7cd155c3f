"""`volta report`: loss curves and summary from a run's metrics.jsonl, resumed steps counted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from volta.cli import main
from volta.training.metrics import JsonlMetrics
from volta.training.report import last_per_step, summarize


def _write(run: Path) -> None:
    m = JsonlMetrics(run / "metrics.jsonl")
    for step in (1, 2, 3, 2, 3, 4):  # steps 2-3 redone after a restart
        rec = {"step": step, "train/loss": 10.0 - step, "train/got_loss": 1.0 / step}
        if step == 4:
            rec["val/grounding_acc"] = 0.5
        m.write(rec)


def test_last_per_step_and_summary(tmp_path: Path) -> None:
    _write(tmp_path)
    from volta.training.metrics import read_jsonl

    rows = last_per_step(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    s = summarize(read_jsonl(tmp_path / "metrics.jsonl"))
    assert s["steps"] == 4 and s["train/loss"] == {"first": 9.0, "last": 6.0}
    assert s["validation"] == {"val/grounding_acc": 0.5}


def test_cli_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    png = Path(summary["loss_curves"])
    assert png.exists() and Image.open(png).size[0] > 300
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics" in capsys.readouterr().err
