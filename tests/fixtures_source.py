"""A copy of the repository's source tree (for building a wheel or shipping a Ray working directory in tests)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import REPO

# Top-level folders that are no source: environments, local data and runs, build outputs (gigabytes in .venv).
_NOT_SOURCE = {".git", ".venv", "venv", "data", "runs", "mlruns", "tmp", "build", "dist"}
_CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache")


def copy_source_tree(dest: Path, *, leave_out: Iterable[str] = ()) -> Path:
    """Copy the repository's source into ``dest`` (symlinks kept as links) and return ``dest``.

    ``leave_out`` names more top-level entries to skip (e.g. ``.gitignore``).
    """
    top = _NOT_SOURCE | set(leave_out)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in top} if Path(folder) == REPO else set()
        return skipped | _CACHES(folder, names)

    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest
