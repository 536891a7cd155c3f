"""Per-step metrics: a JSON-lines file and a readable progress line (rank 0 writes both)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlMetrics:
    """Appends one JSON object per step to ``path``; lines of a resumed run continue the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, metrics: dict[str, Any]) -> None:
        """Append ``metrics`` (non-finite floats written as null so every line is valid JSON)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file, in order."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_progress(metrics: dict[str, float], total_steps: int) -> str:
    """One readable line: step/total, loss and its terms, lr, throughput, ETA."""
    step = int(metrics.get("step", 0))
    parts = [f"step {step}/{total_steps}"]
    for key in ("loss", "bt_loss", "got_loss", "mlm_loss", "itm_loss"):
        if f"train/{key}" in metrics:
            parts.append(f"{key} {metrics[f'train/{key}']:.4f}")
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.3g}")
    if "train/samples_per_s" in metrics:
        parts.append(f"{metrics['train/samples_per_s']:.1f} samples/s")
    if "eta_s" in metrics:
        parts.append(f"ETA {_duration(metrics['eta_s'])}")
    return " | ".join(parts)
