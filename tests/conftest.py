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
    """Mark every test by its tier folder so `-m unit` etc. select by folder too; keep xdist groups working."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "e2e") and not any(item.iter_markers(name=tier)):
            item.add_marker(getattr(pytest.mark, tier))
    if getattr(config.option, "loadgroup", False):  # set on an xdist worker of `--dist loadgroup`
        _suffix_xdist_groups(items)


def _suffix_xdist_groups(items: list[pytest.Item]) -> None:
    """Give each ``xdist_group`` test the ``@group`` node-id suffix by which ``--dist loadgroup`` schedules a group
    on one worker.

    pytest-xdist 3.8 adds it by assigning ``item._nodeid``, which pytest 9 no longer reads (the id lives in
    ``item._id``), so every group was spread over both workers: the Ray tests, each starting a cluster of two
    training workers, ran two at a time on 2 cores (measured: test_a[0..3] of one group on gw0, gw1, gw0, gw1).
    """
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # an older pytest: xdist's own suffix works there
        return
    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = coerce_node_id(item.nodeid + suffix)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
