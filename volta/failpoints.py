"""Failpoints: named places where the fault-injection tests make a process die or a loss go bad.

Armed only by the environment (``VOLTA_FAILPOINTS``), so production runs pay one dictionary lookup at each
site. ``VOLTA_FAILPOINTS`` is a comma-separated list of ``name@rank:step`` (``rank`` or ``step`` may be ``*``;
``step+`` arms every step from ``step`` on). A failpoint that kills fires once per run: it leaves a marker file
in ``VOLTA_FAILPOINTS_DIR`` (required for kills), so the restarted worker group runs on. Sites:

- ``kill_mid_step``: SIGKILL after the forward pass of a step, before its optimizer update (worker).
- ``kill_in_save``: SIGKILL after the rank wrote its checkpoint shard locally, before it reached storage.
- ``kill_unregistered``: every rank uploads its checkpoint part to storage itself, all wait for each other,
  then the armed rank is SIGKILLed before Ray registers the checkpoint.
- ``kill_in_export``: SIGKILL of the driver between the final model and the exported encoders.
- ``nan_loss``: the rank's loss becomes NaN (persistent, use ``step+``).

With ``VOLTA_FAILPOINTS_DIR`` set, :func:`trace` also appends what the tests compare between runs (the sample
keys of every batch) to ``trace-<name>.jsonl`` there.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

__all__ = ["armed", "fire_once", "kill_once", "trace"]

ENV, DIR_ENV = "VOLTA_FAILPOINTS", "VOLTA_FAILPOINTS_DIR"


def _specs() -> list[tuple[str, str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        name, _, where = item.partition("@")
        rank, _, step = (where or "*:*").partition(":")
        out.append((name, rank or "*", step or "*"))
    return out


def _matches(spec: tuple[str, str, str], name: str, rank: int, step: int) -> bool:
    n, r, s = spec
    if n != name or (r != "*" and int(r) != rank):
        return False
    if s == "*":
        return True
    return step >= int(s[:-1]) if s.endswith("+") else step == int(s)


def armed(name: str, *, rank: int = 0, step: int = 0) -> bool:
    """True when failpoint ``name`` is armed for (rank, step)."""
    return any(_matches(spec, name, rank, step) for spec in _specs())


def fire_once(name: str, *, rank: int = 0, step: int = 0) -> bool:
    """True the first time an armed failpoint is reached in this run (a marker records that it fired)."""
    if not armed(name, rank=rank, step=step):
        return False
    folder = Path(os.environ[DIR_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / f"{name}.fired").open("x").close()  # atomic: only one process wins
    except FileExistsError:
        return False
    return True


def kill_once(name: str, *, rank: int = 0, step: int = 0) -> None:
    """SIGKILL this process the first time the armed failpoint ``name`` is reached."""
    if fire_once(name, rank=rank, step=step):
        os.kill(os.getpid(), signal.SIGKILL)


def trace(name: str, record: dict[str, object]) -> None:
    """Append ``record`` to ``$VOLTA_FAILPOINTS_DIR/trace-<name>.jsonl`` (nothing when the variable is unset)."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with (Path(folder) / f"trace-{name}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
