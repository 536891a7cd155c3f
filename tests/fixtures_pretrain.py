"""Fixtures for pre-training integration tests: a tiny synthetic dataset, recipes pointing at it, metrics readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

DEBUG = REPO / "configs" / "debug.yaml"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training and 16 validation synthetic samples at 64 px in 4 + 1 shards, with a tokenizer."""
    from volta.data.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synth_dataset(
        root, train_samples=64, val_samples=16, image_size=64, samples_per_shard=16, tokenizer_vocab_size=300
    )
    return root


def run_overrides(data: Path, out: Path, name: str, **extra: Any) -> list[str]:
    """``--set key=value`` arguments for a debug run on ``data`` writing under ``out``."""
    items = {
        "data.train_shards": str(data / "train"),
        "data.val_shards": str(data / "val"),
        "data.tokenizer": str(data / "tokenizer"),
        "data.num_workers": 0,
        "train.output_dir": str(out),
        "storage.path": str(out / "ray"),
        "ray.run_name": name,
        **extra,
    }
    return [arg for k, v in items.items() for arg in ("--set", f"{k}={v}")]


def last_per_step(metrics_file: Path) -> dict[int, dict[str, Any]]:
    """The last record of every step in a metrics.jsonl (a resumed run re-logs the steps it redoes)."""
    out: dict[int, dict[str, Any]] = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["step"])] = rec
    return out
