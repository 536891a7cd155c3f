"""GOT ablation: the same pre-training with the GOT weight at 0 versus the recipe's default.

Runs ``orchestration/pretrain.py`` twice on a local Ray (same seed, data and steps), then reads the validation
metrics each run logged and prints pointing accuracy (with its random and centre baselines) and retrieval
recall side by side. Run inside the private network namespace::

    scripts/in-private-netns.sh .venv/bin/python -m bench.got_ablation --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from volta.training.metrics import read_jsonl

KEYS = (
    "val/grounding_acc",
    "val/grounding_random",
    "val/grounding_center",
    "val/i2t_r1",
    "val/t2i_r1",
    "val/i2t_r5",
    "val/t2i_r5",
)


def _last_validation(path: Path) -> dict[str, float]:
    rows = [r for r in read_jsonl(path) if "val/grounding_acc" in r or "val/i2t_r1" in r]
    if not rows:
        raise RuntimeError(f"{path}: no validation metrics (set train.val_every)")
    last = max(rows, key=lambda r: r["step"])
    return {k: float(last[k]) for k in KEYS if k in last} | {"step": float(last["step"])}


ARMS = {"got_default": [], "got_zero": ["loss.got.weight=0"]}


def run(
    config: str, overrides: list[str], out_dir: str, arms: tuple[str, ...] = tuple(ARMS)
) -> dict[str, Any]:
    """Train the variants (both unless ``arms`` says otherwise) and return their final validation metrics.

    An arm whose ``metrics.jsonl`` already holds validation metrics under ``out_dir`` and is not in ``arms`` is
    read back instead of retrained (the GOT = 0 arm does not depend on any GOT setting).
    """
    results: dict[str, Any] = {}
    if arms:
        results = _train(config, overrides, out_dir, arms)
    for name in ARMS:
        if name not in results:
            results[name] = _last_validation(Path(out_dir) / f"ablation-{name}" / "metrics.jsonl")
    d, z = results["got_default"], results["got_zero"]
    results["pointing_gain_points"] = 100 * (d["val/grounding_acc"] - z["val/grounding_acc"])
    results["default_over_random"] = d["val/grounding_acc"] / max(d["val/grounding_random"], 1e-9)
    return results


def _train(config: str, overrides: list[str], out_dir: str, arms: tuple[str, ...]) -> dict[str, Any]:
    import ray

    from orchestration.pretrain import main

    results: dict[str, Any] = {}
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        for name, extra in ARMS.items():
            if name not in arms:
                continue
            sets = [
                *overrides,
                *extra,
                f"ray.run_name=ablation-{name}",
                f"train.output_dir={out_dir}",
                f"storage.path={out_dir}/ray",
            ]
            args = ["--config", config]
            for item in sets:
                args += ["--set", item]
            if main(args) != 0:
                raise RuntimeError(f"the {name} run failed")
            results[name] = _last_validation(Path(out_dir) / f"ablation-{name}" / "metrics.jsonl")
    finally:
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="runs/got-ablation")
    p.add_argument(
        "--only",
        choices=(*ARMS, "none"),
        help="train this arm only and read the other one from an earlier run in --out ('none': read both)",
    )
    args = p.parse_args(argv)
    arms = tuple(ARMS) if args.only is None else () if args.only == "none" else (args.only,)
    results = run(args.config, args.overrides, str(Path(args.out).resolve()), arms)
    print(f"{'metric':24s} {'GOT default':>12s} {'GOT = 0':>12s}", file=sys.stderr)
    for k in KEYS:
        print(
            f"{k:24s} {results['got_default'].get(k, float('nan')):12.3f} "
            f"{results['got_zero'].get(k, float('nan')):12.3f}",
            file=sys.stderr,
        )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
