"""A run's report: loss curves as a PNG and a short summary, from the metrics JSON lines the trainer writes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from volta.training.metrics import read_jsonl

LOSS_KEYS = ("train/loss", "train/bt_loss", "train/got_loss", "train/mlm_loss", "train/itm_loss")


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step (the last one: a resumed run re-logs the steps it redid), in step order."""
    by_step = {int(r["step"]): r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(records: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Write one panel per loss term (and validation metrics when present) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = last_per_step(records)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/") and k.endswith(("_acc", "_r1"))})
    keys = [k for k in LOSS_KEYS if any(k in r for r in rows)] + val_keys
    if not keys:
        raise ValueError("no loss or validation metrics in the records")
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key.startswith("val/") else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, first/last values of every loss term, and the last validation metrics."""
    rows = last_per_step(records)
    if not rows:
        return {"steps": 0}
    out: dict[str, Any] = {"steps": int(rows[-1]["step"])}
    for key in LOSS_KEYS:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[key] = {"first": vals[0], "last": vals[-1]}
    val_rows = [r for r in rows if any(k.startswith("val/") for k in r)]
    if val_rows:
        out["validation"] = {k: v for k, v in val_rows[-1].items() if k.startswith("val/")}
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """``volta report RUN_DIR``: loss-curve PNG and a JSON summary of a run's metrics.jsonl."""
    p = subparsers.add_parser("report", help="loss curves (PNG) and a summary of a run's metrics.jsonl")
    p.add_argument("run_dir", help="the run's folder (train.output_dir/ray.run_name), holding metrics.jsonl")
    p.add_argument("--png", help="where to write the curves (default RUN_DIR/loss-curves.png)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from volta.errors import UsageError

    run = Path(args.run_dir)
    records = read_jsonl(run / "metrics.jsonl")
    if not records:
        raise UsageError(f"{run / 'metrics.jsonl'}: no metrics (is this a run folder?)")
    png = plot_losses(records, args.png or run / "loss-curves.png")
    summary = summarize(records)
    summary["loss_curves"] = str(png)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0
