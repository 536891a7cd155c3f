"""Run the ``volta`` console script as a user runs it: the virtualenv's, offline, in a clean environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VOLTA = Path(sys.executable).parent / "volta"


def volta(*args: str | Path, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``volta ARGS`` in ``cwd`` with a minimal environment (HOME = cwd, hub access off)."""
    return subprocess.run(
        [str(VOLTA), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(cwd)},
    )
