"""Helpers shared by the container and Kubernetes tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

LOCK_TOOL = Path(__file__).resolve().parent.parent / "scripts" / "lock.py"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of docker/versions.env (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def load_lock_tool() -> ModuleType:
    """scripts/lock.py as a module (it is a standalone script, runnable without the venv)."""
    spec = importlib.util.spec_from_file_location("volta_lock_tool", LOCK_TOOL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def locked_versions() -> dict[str, str]:
    """Normalised name -> exact version of every package in requirements/lock.txt and requirements/torch.txt."""
    tool = load_lock_tool()
    return tool.pinned_versions(tool.LOCK) | tool.pinned_versions(tool.TORCH_LOCK)
