"""Golden per-step losses of the debug recipe: the numbers a refactor must not move.

Eight optimizer steps of the debug model (dropout off, every loss term on, the GOT contrast included) in float64
with the plain-torch engine, on seeded random batches, for each task variant (prefix sharing on and off; uniform
and hard ITM negatives). Every loss term, the logged statistics and the gradient norm of each step are compared
with ``tests/golden/debug_losses.json``.

A deliberate change of the numbers (a loss fix, a new default, a dependency upgrade that changes initialisation)
regenerates the file, and the commit says why::

    .venv/bin/python -m tests.golden_losses --update
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from tests.fixtures_task import VOCAB, batch_double, make_batch, tiny_config
from volta.models.factory import build_model
from volta.task import VoLTATask
from volta.training.engine import TorchEngine
from volta.training.schedule import build_optimizer, build_scheduler

GOLDEN = Path(__file__).resolve().parent / "golden" / "debug_losses.json"
STEPS = 8
BATCH = 8
# Every term on, so each one is pinned (the debug recipe leaves the GOT contrast off).
ALL_TERMS = ("loss.got.contrastive.weight=0.1", "optim.grad_clip=1.0")
VARIANTS: dict[str, tuple[str, ...]] = {
    "prefix_sharing-uniform_negatives": ("model.share_unimodal_prefix=true", "loss.itm.negatives=uniform"),
    "prefix_sharing-hard_negatives": ("model.share_unimodal_prefix=true", "loss.itm.negatives=hard"),
    "no_prefix_sharing-uniform_negatives": (
        "model.share_unimodal_prefix=false",
        "loss.itm.negatives=uniform",
    ),
}


def run_variant(overrides: tuple[str, ...]) -> list[dict[str, float]]:
    """Per-step records (every returned term as a float, plus the gradient norm) of one variant."""
    config = tiny_config(*ALL_TERMS, *overrides)
    torch.manual_seed(0)
    model = build_model(config.model, vocab_size=VOCAB).double()
    task = VoLTATask(model, config.loss, share_prefix=config.model.share_unimodal_prefix)
    optimizer = build_optimizer(task, config.optim, global_batch_size=BATCH)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=STEPS, steps_per_epoch=STEPS)
    engine = TorchEngine(task, optimizer, scheduler, grad_clip=config.optim.grad_clip)
    records = []
    for step in range(STEPS):
        batch = batch_double(make_batch(config, b=BATCH, seed=1000 + step))
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()
        record = {name: float(value.detach()) for name, value in sorted(out.items())}
        record["grad_norm"] = float(engine.grad_norm() or 0.0)
        records.append(record)
    return records


def compute() -> dict[str, Any]:
    """The golden document: settings and, per variant, the per-step records."""
    torch.use_deterministic_algorithms(True)
    return {
        "steps": STEPS,
        "batch": BATCH,
        "overrides": list(ALL_TERMS),
        "variants": {name: run_variant(overrides) for name, overrides in VARIANTS.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN.name}")
    args = parser.parse_args()
    doc = compute()
    if args.update:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(doc, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
