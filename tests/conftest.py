"""Shared test setup: offline Hugging Face, CPU DeepSpeed, quiet Ray; markers by folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# Two pytest-xdist workers share two cores: more torch threads per process only oversubscribe them (measured
# 50x slower on some model tests). Subprocesses the tests start inherit the variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Flat resident memory for long-running CPU training processes (see orchestration/pretrain.py MALLOC_ENV).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its tier folder so `-m unit` etc. select by folder too."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "e2e") and not any(item.iter_markers(name=tier)):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
