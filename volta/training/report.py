"""A run's report: loss curves as a PNG and a short summary, from the metrics JSON lines the trainer writes.

``volta report RUN_DIR --table`` adds what a person reads after ``make demo``: one table of the evaluation's
pointing, retrieval and ITM figures for the trained and the untrained model with their chance baselines (from
``volta eval all`` JSON saved as ``eval-trained.json`` and ``eval-untrained.json`` in the run folder), and where
the run's pictures, curves, checkpoints and weights are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


NOT_MEASURED = "not measured"
NOT_APPLICABLE = "-"
EVAL_FILES = ("eval-trained.json", "eval-untrained.json")


@dataclass(frozen=True)
class SummaryRow:
    """One row of the summary table: a metric, its value for the trained and the untrained model, and the
    baselines that need no model (a uniformly random patch or ranking; the centre patch for pointing)."""

    metric: str
    trained: str
    untrained: str
    random: str
    centre: str = NOT_APPLICABLE


def _get(doc: Mapping[str, Any] | None, section: str, key: str) -> float | None:
    values = doc.get(section) if doc else None
    value = values.get(key) if isinstance(values, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else None


def _cell(*values: float | None) -> str:
    """``0.123`` or ``0.100 / 0.250 / 0.400`` for several values; NOT_MEASURED when any is missing."""
    if not values or any(v is None for v in values):
        return NOT_MEASURED
    return " / ".join(f"{v:.3f}" for v in values if v is not None)


def retrieval_chance(k: int, n_images: float, n_texts: float, direction: str) -> float:
    """Recall@K of a uniformly random ranking: caption-to-image ``K / images``; image-to-caption, the chance that
    one of an image's ``texts / images`` captions is among the first K (as :func:`recall_at_k` counts ranks)."""
    ni, nt = int(n_images), int(n_texts)
    if ni < 1 or nt < 1:
        return math.nan
    if direction == "t2i":
        return min(1.0, k / ni)
    m = max(1, round(nt / ni))  # captions per image
    none_in_top_k = 1.0
    for j in range(min(k, nt)):
        none_in_top_k *= max(0, nt - m - j) / (nt - j)
    return 1.0 - none_in_top_k


def _retrieval_ks(doc: Mapping[str, Any] | None) -> list[int]:
    values = doc.get("retrieval") if doc else None
    if not isinstance(values, Mapping):
        return []
    return sorted({int(k.removeprefix("i2t_r")) for k in values if k.startswith("i2t_r")})


def summary_rows(trained: Mapping[str, Any] | None, untrained: Mapping[str, Any] | None) -> list[SummaryRow]:
    """The summary table from two ``volta eval all`` JSON documents (the trained model's and a random-init one's):
    phrase pointing, word pointing overall and per word class (with, where measured, the share of the class's words
    pointed at another object the caption names), retrieval recall@K both ways (projector and, when
    present, backbone features), linear probe and ITM accuracy. A figure missing from a document is NOT_MEASURED;
    the random and centre baselines come from the trained model's evaluation (the same samples)."""
    rows: list[SummaryRow] = []
    base = trained or untrained

    def pointing(label: str, key: str, suffix: str = "") -> SummaryRow:
        """``{key}acc{suffix}`` for both models, the random and centre baselines beside it."""
        return SummaryRow(
            label,
            *(
                _cell(_get(d, "grounding", f"{key}{name}{suffix}"))
                for d, name in ((trained, "acc"), (untrained, "acc"), (base, "random"), (base, "center"))
            ),
        )

    rows.append(pointing("phrase pointing", ""))
    rows.append(pointing("word pointing, all words", "word_"))
    grounding = (base or {}).get("grounding") or {}
    for name in sorted(k.removeprefix("word_acc/") for k in grounding if k.startswith("word_acc/")):
        rows.append(pointing(f"word pointing, {name}", "word_", f"/{name}"))
        if f"word_other/{name}" in grounding:
            # misses on another object the caption names: a word that only finds *some* named object scores
            # about as much here as above (an untrained model does), one that picks its own scores far less
            rows.append(
                SummaryRow(
                    f"  ... {name} words on another named object",
                    _cell(_get(trained, "grounding", f"word_other/{name}")),
                    _cell(_get(untrained, "grounding", f"word_other/{name}")),
                    NOT_APPLICABLE,
                )
            )
    ks = _retrieval_ks(trained) or _retrieval_ks(untrained) or [1, 5, 10]
    n_images = _get(base, "retrieval", "n_images")
    n_texts = _get(base, "retrieval", "n_texts")
    at = "/".join(str(k) for k in ks)
    for prefix, features in (("", "projector"), ("local_", "GOT token means"), ("global_", "backbone")):
        if prefix and not any(
            _get(d, "retrieval", f"{prefix}i2t_r{ks[0]}") is not None for d in (trained, untrained)
        ):
            continue  # not measured (backbone: the two backbones differ in width)
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            keys = [f"{prefix}{direction}_r{k}" for k in ks]
            chance = (
                [retrieval_chance(k, n_images, n_texts, direction) for k in ks]
                if n_images is not None and n_texts is not None
                else [None]
            )
            rows.append(
                SummaryRow(
                    f"retrieval {label} R@{at} ({features})",
                    _cell(*(_get(trained, "retrieval", key) for key in keys)),
                    _cell(*(_get(untrained, "retrieval", key) for key in keys)),
                    _cell(*chance),
                )
            )
    rows.append(
        SummaryRow(
            "linear probe accuracy",
            _cell(_get(trained, "probe", "acc")),
            _cell(_get(untrained, "probe", "acc")),
            NOT_APPLICABLE,
        )
    )
    itm_measured = any(_get(d, "itm", "acc") is not None for d in (trained, untrained))
    rows.append(
        SummaryRow(
            "ITM accuracy (held-out)",
            _cell(_get(trained, "itm", "acc")),
            _cell(_get(untrained, "itm", "acc")),
            _cell(_get(base, "itm", "chance") or 0.5) if itm_measured else NOT_APPLICABLE,
        )
    )
    return rows


def format_table(rows: Sequence[SummaryRow]) -> str:
    """The rows as a plain aligned text table with a header line (one line per row, no colour)."""
    header = SummaryRow("metric", "trained", "untrained", "random", "centre")
    table = [header, *rows]
    widths = [
        max(len(getattr(r, f)) for r in table) for f in ("metric", "trained", "untrained", "random", "centre")
    ]
    lines = []
    for row in table:
        cells = (row.metric, row.trained, row.untrained, row.random, row.centre)
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)


def _read_eval(path: Path) -> dict[str, Any] | None:
    """A ``volta eval all`` JSON document, or None when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def run_summary(run: Path, records: list[dict[str, Any]], curves: Path) -> str:
    """The human summary of a run folder: steps and loss, the summary table (:func:`summary_rows` over the
    folder's ``eval-trained.json`` and ``eval-untrained.json``), notes, and where the run's files are."""
    trained, untrained = (_read_eval(run / name) for name in EVAL_FILES)
    info = summarize(records)
    loss = info.get("train/loss", {})
    lines = [f"steps trained: {info['steps']}"]
    if loss:
        lines[0] += f"; loss {loss['first']:.3f} -> {loss['last']:.3f}"
    lines += ["", format_table(summary_rows(trained, untrained)), ""]
    lines.append(
        "random: a uniformly random patch (pointing) or ranking (retrieval); centre: the centre patch; "
        "untrained: the same model freshly initialised"
    )
    itm = [r["train/itm_acc"] for r in last_per_step(records) if r.get("train/itm_acc") is not None]
    if itm and not any(_get(d, "itm", "acc") is not None for d in (trained, untrained)):
        lines.append(f"ITM accuracy on training batches (last logged, chance 0.5): {itm[-1]:.3f}")
    places = [
        ("heat maps", [run / "heatmaps-final", run / "heatmaps"]),
        ("loss curves", [curves]),
        ("metrics", [run / "metrics.jsonl"]),
        ("evaluation", [run / name for name in EVAL_FILES]),
        ("checkpoints", sorted(run.glob("checkpoint-*"))[-1:]),
        ("final model", [run / "final"]),
        ("exported encoders", [run / "export"]),
    ]
    lines += ["", f"run folder: {run}"]
    for label, paths in places:
        found = [str(p.relative_to(run)) if p.is_relative_to(run) else str(p) for p in paths if p.exists()]
        if found:
            lines.append(f"  {label + ':':<19}{', '.join(found)}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """``volta report RUN_DIR``: loss-curve PNG and a JSON summary of a run's metrics.jsonl."""
    p = subparsers.add_parser("report", help="loss curves (PNG) and a summary of a run's metrics.jsonl")
    p.add_argument("run_dir", help="the run's folder (train.output_dir/ray.run_name), holding metrics.jsonl")
    p.add_argument("--png", help="where to write the curves (default RUN_DIR/loss-curves.png)")
    p.add_argument(
        "--table",
        action="store_true",
        help="print a table for people instead of JSON: trained vs untrained vs chance from the folder's "
        "eval-trained.json and eval-untrained.json (`volta eval all` output), and where the run's files are",
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from volta.errors import UsageError

    run = Path(args.run_dir)
    records = read_jsonl(run / "metrics.jsonl")
    if not records:
        raise UsageError(f"{run / 'metrics.jsonl'}: no metrics (is this a run folder?)")
    png = plot_losses(records, args.png or run / "loss-curves.png")
    if args.table:
        print(run_summary(run, records, png))
        return 0
    summary = summarize(records)
    summary["loss_curves"] = str(png)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0
