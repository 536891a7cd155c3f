"""Shared test setup: offline Hugging Face, CPU DeepSpeed, quiet Ray; markers by folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A `ray start --block` head stopped with SIGTERM first drains its node for up to 30 s (Ray 2.60): on a cluster the
# preemption notice of Train workers (the k8s pods keep it); the tests stop their heads only after their jobs, and
# each head would spend the 30 s at teardown.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# Two pytest-xdist workers share two cores: more torch threads per process only oversubscribe them (measured
# 50x slower on some model tests). Subprocesses the tests start inherit the variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Flat resident memory for long-running CPU training processes (see orchestration/pretrain.py MALLOC_ENV).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


# What orchestration.pretrain.main sets in quiet mode (QUIET_ENV + RAY_LOGGER_LEVEL; test_demo_output checks).
QUIET_MODE_ENV_KEYS = ("RAY_LOGGER_LEVEL", "TORCH_CPP_LOG_LEVEL")


@pytest.fixture(autouse=True)
def _keep_quiet_mode_env_to_its_test() -> Iterator[None]:
    """``orchestration.pretrain.main`` without ``--verbose`` sets ``RAY_LOGGER_LEVEL``/``TORCH_CPP_LOG_LEVEL`` in its
    process (read when Ray starts). Tests call it in-process, so without this the setting leaked into every later
    test of the pytest worker and the Ray clusters they start (CI: a benchmark's job driver lost its INFO lines)."""
    keys = QUIET_MODE_ENV_KEYS
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
