"""Alignment study: configurations x seeds x datasets -> pointing per word class, ITM and retrieval, with the
targets of "alignment for every word" checked per run.

Each run is ``volta train`` (the training loop in one process, no Ray) of ``--config`` with the arm's and the
seed's overrides on one dataset folder (``<dir>/train``, ``<dir>/val``, ``<dir>/tokenizer``, as ``volta data
synth`` writes them), ``--jobs`` at a time with one thread each. A run whose ``metrics.jsonl`` already ends with
validation metrics at its last step is read back, not retrained, so a study can be extended or resumed; one whose
saved config differs from what the study would train now (the config, the arm's overrides or ``--set`` changed
under the same run name) stops the study before any training, naming the settings. Prints a
Markdown table (one row per arm x dataset x seed) and the targets each run misses, and writes ``study.json``::

    .venv/bin/python -m bench.alignment --dataset shapes=data/synth --dataset scenes=data/scenes \\
        --arm recipe --arm got_off=loss.got.weight=0 --seeds 0 1 2 --jobs 2

Targets (per run; the GOT-off run of the same dataset and seed is the reference): attribute and object words
each point at >= 2x their random baseline; phrase pointing >= GOT-off + 15 points; held-out ITM >= 0.75; the
GOT token means retrieve at R@10 >= 3x chance both ways; retrieval R@1/5/10 (projector and GOT token means) no
worse than GOT-off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from volta.config import config_from_dict, load_config
from volta.training.metrics import read_jsonl
from volta.training.report import retrieval_chance

REFERENCE_ARM = "got_off"
WORD_CLASSES = ("attribute", "object", "relation")
KS = (1, 5, 10)


@dataclass(frozen=True)
class Run:
    """One training run of the study: an arm (named overrides), a seed and a dataset folder."""

    arm: str
    overrides: tuple[str, ...]
    seed: int
    dataset: str
    data_dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.dataset}-s{self.seed}"

    def sets(self, out_dir: Path, extra: Sequence[str]) -> list[str]:
        """The run's ``--set`` overrides of the study's config."""
        return [
            f"train.output_dir={out_dir}",
            f"ray.run_name={self.name}",
            f"train.seed={self.seed}",
            f"data.train_shards={self.data_dir / 'train'}",
            f"data.val_shards={self.data_dir / 'val'}",
            f"data.tokenizer={self.data_dir / 'tokenizer'}",
            *extra,
            *self.overrides,
        ]

    def command(self, config: str, out_dir: Path, extra: Sequence[str]) -> list[str]:
        cli = [sys.executable, "-m", "volta.cli", "train", "--config", config]
        return cli + [arg for item in self.sets(out_dir, extra) for arg in ("--set", item)]

    def changed_settings(self, config: str, out_dir: Path, extra: Sequence[str]) -> list[str]:
        """The settings (dotted keys) in which the finished run's saved config differs from what this study
        would train now; [] when they agree or the run saved none.

        The saved config is read through the current schema, so a setting added since, at its default, is no
        change; ``ray.*`` (the Ray Train launch, which ``volta train`` in one process does not read) is left
        out but ``ray.run_name``, which names the run's folders."""
        saved = out_dir / self.name / "final" / "config.yaml"
        if not saved.exists():
            return []
        want = _flat(load_config(config, self.sets(out_dir, extra)).model_dump(mode="json"))
        try:
            have = _flat(config_from_dict(yaml.safe_load(saved.read_text()) or {}).model_dump(mode="json"))
        except ValueError as err:  # a setting the schema no longer has
            return [f"{saved}: {str(err).splitlines()[0]}"]
        keys = {k for k in want.keys() | have.keys() if not k.startswith("ray.") or k == "ray.run_name"}
        return sorted(k for k in keys if _local(want.get(k)) != _local(have.get(k)))


def _local(value: Any) -> Any:
    """A local path as the absolute path it names from here (``data/synth`` and ``/repo/data/synth`` are one
    folder when run from ``/repo``); any other value as it is."""
    if isinstance(value, str) and "://" not in value and (value.startswith(("/", ".")) or "/" in value):
        return str(Path(value).resolve())
    return value


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_arm(text: str) -> tuple[str, tuple[str, ...]]:
    """``name`` or ``name=key=value,key=value`` -> (name, overrides); ``got_off`` alone means GOT weight 0."""
    name, _, rest = text.partition("=")
    if not name.isidentifier():
        raise ValueError(f"--arm {text!r}: expected NAME or NAME=key=value[,key=value...]")
    overrides = tuple(item for item in rest.split(",") if item) if rest else ()
    if name == REFERENCE_ARM and not overrides:
        overrides = ("loss.got.weight=0",)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--arm {text!r}: override {item!r} is not key=value")
    return name, overrides


def final_validation(path: Path) -> dict[str, float] | None:
    """The validation metrics logged at the run's last step (None when the run has none there: not finished)."""
    if not path.exists():
        return None
    rows = read_jsonl(path)
    if not rows:
        return None
    last_step = max(int(r["step"]) for r in rows)
    merged: dict[str, float] = {}
    for r in rows:
        if int(r["step"]) == last_step:
            merged.update({k: float(v) for k, v in r.items() if k.startswith("val/")})
    return merged if "val/grounding_acc" in merged else None


def _recalls(m: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{d}_r{k}": m[f"val/{prefix}{d}_r{k}"]
        for d in ("i2t", "t2i")
        for k in KS
        if f"val/{prefix}{d}_r{k}" in m
    }


def misses(metrics: Mapping[str, float], reference: Mapping[str, float] | None) -> list[str]:
    """The targets one run misses (empty: all met). ``reference`` is the GOT-off run of the same dataset and
    seed (None for the GOT-off run itself, or when it was not run: the relative targets are then skipped)."""
    out: list[str] = []
    for cls in ("attribute", "object"):
        acc, rnd = (
            metrics.get(f"val/grounding_word_acc/{cls}"),
            metrics.get(f"val/grounding_word_random/{cls}"),
        )
        if acc is None or rnd is None:
            out.append(f"{cls} words not measured")
        elif acc < 2 * rnd:
            out.append(f"{cls} words {acc:.3f} < 2x random {rnd:.3f}")
    itm = metrics.get("val/itm_acc")
    if itm is None or itm < 0.75:
        out.append("ITM not measured" if itm is None else f"ITM {itm:.3f} < 0.75")
    n_images, n_texts = metrics.get("val/retrieval_n_images"), metrics.get("val/retrieval_n_texts")
    for d in ("i2t", "t2i"):
        got = metrics.get(f"val/local_{d}_r10")
        if got is None or n_images is None or n_texts is None:
            out.append(f"GOT-mean {d} R@10 not measured")
            continue
        chance = retrieval_chance(10, n_images, n_texts, d)
        if got < 3 * chance:
            out.append(f"GOT-mean {d} R@10 {got:.3f} < 3x chance {chance:.3f}")
    if reference is not None:
        phrase, ref_phrase = metrics["val/grounding_acc"], reference["val/grounding_acc"]
        if phrase < ref_phrase + 0.15:
            out.append(f"phrase {phrase:.3f} < GOT-off {ref_phrase:.3f} + 0.15")
        for prefix in ("", "local_"):
            mine, theirs = _recalls(metrics, prefix), _recalls(reference, prefix)
            worse = [k for k in mine if k in theirs and mine[k] < theirs[k]]
            if worse:
                out.append(f"retrieval worse than GOT-off: {', '.join(worse)}")
    return out


def _class_cell(acc: float | None, rnd: float | None, other: float | None = None) -> str:
    # "hit rate (x random)", then the rate of misses on another named object when the run measured it
    if acc is None or not rnd:
        return "-"
    return f"{acc:.3f} ({acc / rnd:.1f})" + ("" if other is None else f" o {other:.3f}")


def _pair_cell(i2t: float | None, t2i: float | None) -> str:
    return "-" if i2t is None or t2i is None else f"{i2t:.3f}/{t2i:.3f}"


def table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: arm, dataset, seed -> phrase, word pointing per class (x random; "o": the share of words
    pointed at another object the caption names, where measured), ITM, R@10 (projector, GOT means, backbone;
    i2t/t2i), targets missed."""
    head = ["arm", "dataset", "seed", "phrase", *(f"{c} (x rnd)" for c in WORD_CLASSES), "ITM",
            "proj R@10", "GOT-mean R@10", "backbone R@10", "targets missed"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        m = r["metrics"]

        def cls(c: str, m: Mapping[str, float] = m) -> str:
            return _class_cell(
                m.get(f"val/grounding_word_acc/{c}"),
                m.get(f"val/grounding_word_random/{c}"),
                m.get(f"val/grounding_word_other/{c}"),
            )

        def r10(prefix: str, m: Mapping[str, float] = m) -> str:
            return _pair_cell(m.get(f"val/{prefix}i2t_r10"), m.get(f"val/{prefix}t2i_r10"))

        itm = m.get("val/itm_acc")
        row = [r["arm"], r["dataset"], str(r["seed"]), f"{m['val/grounding_acc']:.3f}",
               *(cls(c) for c in WORD_CLASSES), "-" if itm is None else f"{itm:.3f}",
               r10(""), r10("local_"), r10("global_"), str(len(r["misses"]))]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def means_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the means over seeds per arm and dataset (word classes as mean accuracy with mean
    accuracy / mean random baseline), and how many seeds met every target."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["dataset"]), []).append(r)
    head = ["arm", "dataset", "seeds", "phrase", *(f"{c} (x rnd)" for c in WORD_CLASSES), "ITM",
            "proj R@10", "GOT-mean R@10", "seeds meeting every target"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (arm, dataset), runs in groups.items():

        def mean(key: str, runs: Sequence[Mapping[str, Any]] = runs) -> float | None:
            values = [r["metrics"][key] for r in runs if key in r["metrics"]]
            return sum(values) / len(values) if len(values) == len(runs) else None

        def cls(c: str) -> str:
            return _class_cell(
                mean(f"val/grounding_word_acc/{c}"),
                mean(f"val/grounding_word_random/{c}"),
                mean(f"val/grounding_word_other/{c}"),
            )

        def r10(prefix: str) -> str:
            return _pair_cell(mean(f"val/{prefix}i2t_r10"), mean(f"val/{prefix}t2i_r10"))

        phrase, itm = mean("val/grounding_acc"), mean("val/itm_acc")
        met = sum(1 for r in runs if not r["misses"])
        row = [arm, dataset, str(len(runs)), "-" if phrase is None else f"{phrase:.3f}",
               *(cls(c) for c in WORD_CLASSES), "-" if itm is None else f"{itm:.3f}",
               r10(""), r10("local_"), f"{met}/{len(runs)}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _launch(runs: Sequence[Run], config: str, out_dir: Path, extra: Sequence[str], jobs: int) -> None:
    """Train ``runs`` with at most ``jobs`` at once, one thread each; a failed run stops the study."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(runs)
    active: list[tuple[Run, subprocess.Popen[bytes], Any]] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            log = (out_dir / f"{run.name}.log").open("w")
            print(f"training {run.name}", file=sys.stderr)
            active.append(
                (
                    run,
                    subprocess.Popen(run.command(config, out_dir, extra), stdout=log, stderr=log, env=env),
                    log,
                )
            )
        time.sleep(2)
        for item in list(active):
            run, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            active.remove(item)
            if proc.returncode != 0:
                for _, other, _ in active:
                    other.terminate()
                raise RuntimeError(
                    f"{run.name} failed (exit {proc.returncode}); see {out_dir / run.name}.log"
                )


def study(
    config: str,
    arms: Sequence[tuple[str, tuple[str, ...]]],
    datasets: Sequence[tuple[str, Path]],
    seeds: Sequence[int],
    out_dir: Path,
    *,
    extra: Sequence[str] = (),
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train what is missing, then return one result per run (arm, dataset, seed, metrics, misses)."""
    runs = [Run(a, o, s, d, p) for d, p in datasets for s in seeds for a, o in arms]
    todo = [r for r in runs if final_validation(out_dir / r.name / "metrics.jsonl") is None]
    stale = {r.name: r.changed_settings(config, out_dir, extra) for r in runs if r not in todo}
    stale = {name: keys for name, keys in stale.items() if keys}
    if stale:
        detail = "; ".join(f"{name}: {', '.join(keys[:5])}" for name, keys in stale.items())
        raise ValueError(
            f"finished runs in {out_dir} were trained with other settings ({detail}): "
            "pass a new --out or new arm names"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _launch(todo, config, out_dir, extra, jobs)
    final = {r.name: final_validation(out_dir / r.name / "metrics.jsonl") for r in runs}
    results = []
    for r in runs:
        metrics = final[r.name]
        if metrics is None:
            raise RuntimeError(f"{r.name}: no validation metrics at its last step (set train.val_every)")
        ref = (
            final.get(Run(REFERENCE_ARM, (), r.seed, r.dataset, r.data_dir).name)
            if r.arm != REFERENCE_ARM
            else None
        )
        results.append({"arm": r.arm, "overrides": list(r.overrides), "dataset": r.dataset, "seed": r.seed,
                        "metrics": metrics, "misses": misses(metrics, ref)})  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--arm", action="append", default=[], help="NAME or NAME=key=value[,...] (repeatable)")
    p.add_argument("--dataset", action="append", default=[], help="NAME=DIR with train/, val/, tokenizer/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every run")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/alignment-study")
    args = p.parse_args(argv)
    try:
        arms = [parse_arm(a) for a in (args.arm or ["recipe", REFERENCE_ARM])]
        datasets = []
        for item in args.dataset or ["shapes=data/synth"]:
            name, sep, folder = item.partition("=")
            if not sep or not (Path(folder) / "val").is_dir():
                raise ValueError(
                    f"--dataset {item!r}: expected NAME=DIR with DIR/train, DIR/val, DIR/tokenizer"
                )
            datasets.append((name, Path(folder)))
    except ValueError as err:
        print(f"bench.alignment: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    try:
        results = study(
            args.config, arms, datasets, args.seeds, out, extra=args.overrides, jobs=max(1, args.jobs)
        )
    except ValueError as err:
        print(f"bench.alignment: {err}", file=sys.stderr)
        return 2
    (out / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print()
    print(means_table(results))
    for r in results:
        for miss in r["misses"]:
            print(f"{r['arm']} {r['dataset']} seed {r['seed']}: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
