"""``volta eval retrieval|grounding|probe|all|zeroshot`` and ``volta visualize`` over a saved VoLTA checkpoint.

Evaluation commands print a JSON summary on stdout (machine-readable) and a table on stderr. The evaluation
config is the checkpoint's own config with ``--set`` overrides, or ``--config RECIPE`` (+ ``--set``) with the
checkpoint's model section (the weights define the model). Heavy imports happen inside the command functions so
that ``volta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volta.commands import positive_int
from volta.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from volta.config import VoltaConfig
    from volta.eval.validate import EvalPass
    from volta.models.volta_model import VoLTAModel

log = logging.getLogger(__name__)

_BASELINE_SEED_OFFSET = 1000  # the probe's random encoder never shares the --random-init model's seed


# -------------------------------------------------------------------------------------------------- loading
def _load(
    args: argparse.Namespace,
) -> tuple[VoLTAModel, VoltaConfig, PreTrainedTokenizerBase, Any, Path | None]:
    """Model (trained or, with --random-init, fresh), evaluation config, tokenizer, device and checkpoint folder.

    The checkpoint is read as ``volta.load`` reads it (:func:`volta.api.load_checkpoint`): a checkpoint folder or
    a file in it, a run folder, an engine checkpoint folder, or any of these on S3.
    """
    from volta.api import load_checkpoint, load_matching_tokenizer
    from volta.config import apply_overrides, config_from_dict, load_config
    from volta.devices import resolve_device
    from volta.eval.linear_probe import fresh_model_like

    if args.checkpoint is None:
        return _load_recipe_baseline(args)
    try:
        model, ckpt_cfg, folder = load_checkpoint(args.checkpoint)
    except UsageError as err:
        raise UsageError(f"--checkpoint {err}") from None
    for item in args.overrides:
        if item.strip().startswith("model."):
            raise UsageError(f"--set {item}: the model is defined by the checkpoint and cannot be overridden")
    if args.config:
        cfg = load_config(args.config, args.overrides).model_copy(update={"model": ckpt_cfg.model})
    else:
        cfg = config_from_dict(apply_overrides(ckpt_cfg.model_dump(mode="json"), args.overrides))
    if args.random_init:
        model = fresh_model_like(model, cfg.model, seed=args.seed)
    try:
        tokenizer = load_matching_tokenizer(args.tokenizer or cfg.tokenizer_name, model.vocab_size)
    except UsageError as err:
        raise UsageError(f"{err} (--tokenizer)") from None
    try:
        device = resolve_device(args.device)
    except UsageError as err:
        raise UsageError(f"--{err}") from None
    return model.to(device), cfg, tokenizer, device, folder


def _load_recipe_baseline(
    args: argparse.Namespace,
) -> tuple[VoLTAModel, VoltaConfig, PreTrainedTokenizerBase, Any, Path | None]:
    """No checkpoint: ``--random-init --config RECIPE`` is a freshly initialised model of the recipe (with its
    ``--set`` overrides, ``model.*`` included) and the recipe's tokenizer, seeded as a checkpoint's would be:
    the untrained baseline of a run before the run has a checkpoint. The folder is None."""
    import torch

    from volta.api import load_matching_tokenizer
    from volta.config import load_config
    from volta.devices import resolve_device
    from volta.models.factory import build_model

    if not (args.random_init and args.config):
        raise UsageError(
            "--checkpoint is required (without one, --random-init --config RECIPE evaluates a freshly "
            "initialised model of the recipe)"
        )
    cfg = load_config(args.config, args.overrides)
    try:
        tokenizer = load_matching_tokenizer(args.tokenizer or cfg.tokenizer_name, None)
    except UsageError as err:
        raise UsageError(f"{err} (--tokenizer)") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(cfg.model, vocab_size=len(tokenizer))
    try:
        device = resolve_device(args.device)
    except UsageError as err:
        raise UsageError(f"--{err}") from None
    return model.to(device), cfg, tokenizer, device, None


def _shards(args: argparse.Namespace, cfg: VoltaConfig) -> str | list[str]:
    shards = args.shards or cfg.data.val_shards
    if not shards:
        raise UsageError("no evaluation shards: pass --shards PATH (or set data.val_shards)")
    return shards  # type: ignore[no-any-return]


def _pass(
    model: VoLTAModel,
    cfg: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: Any,
    shards: str | list[str],
    args: argparse.Namespace,
    *,
    grounding: bool,
) -> EvalPass:
    from volta.eval.validate import evaluate_pass

    try:
        return evaluate_pass(
            model,
            cfg,
            tokenizer,
            shards=shards,
            device=device,
            max_samples=args.max_samples or cfg.eval.max_samples,
            batch_size=args.batch_size,
            grounding=grounding,
        )
    except FileNotFoundError as err:
        raise UsageError(f"--shards: {err}") from None
    except ValueError as err:
        raise UsageError(f"{shards}: {err}") from None


# --------------------------------------------------------------------------------------------------- probe
def _probe(
    model: VoLTAModel,
    cfg: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: Any,
    test: EvalPass,
    shards: str | list[str],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Probe accuracy of ``model`` and of a random encoder; raises ValueError when there are no usable labels."""
    from volta.eval.linear_probe import fresh_model_like, labelled, linear_probe, split_indices

    def features(m: VoLTAModel, shards: str | list[str], reuse: EvalPass | None) -> tuple[Any, list[Any]]:
        result = reuse or _pass(m, cfg, tokenizer, device, shards, args, grounding=False)
        return labelled(result.features)

    def run(m: VoLTAModel, reuse: EvalPass | None) -> dict[str, float]:
        x, y = features(m, shards, reuse)
        if not y:
            raise ValueError("no sample carries a 'label' in its JSON")
        if args.train_shards:
            xtr, ytr = features(m, args.train_shards, None)
            if not ytr:
                raise ValueError(f"{args.train_shards}: no sample carries a 'label' in its JSON")
            return linear_probe(xtr, ytr, x, y, c=cfg.eval.probe_c, seed=args.seed)
        tr, te = split_indices(len(y), cfg.eval.probe_test_fraction, seed=args.seed)
        return linear_probe(
            x[tr], [y[i] for i in tr], x[te], [y[i] for i in te], c=cfg.eval.probe_c, seed=args.seed
        )

    out = run(model, test)
    baseline = fresh_model_like(model, cfg.model, seed=args.seed + _BASELINE_SEED_OFFSET)
    out["random_init_acc"] = run(baseline, None)["acc"]
    return out


# ------------------------------------------------------------------------------------------------- commands
def _print_table(summary: dict[str, Any]) -> None:
    lines = [f"{k}: {summary[k]}" for k in ("checkpoint", "model", "shards", "samples")]
    for section in ("retrieval", "itm", "grounding", "probe", "zeroshot"):
        if section not in summary:
            continue
        values = summary[section]
        if values is None:
            lines.append(f"{section}: skipped ({summary.get('notes', {}).get(section, 'not available')})")
            continue
        lines.append(f"{section}:")
        for name, value in values.items():
            shown = f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"
            lines.append(f"  {name:<28} {shown}")
    words = summary.get("grounding_words")
    if words:
        lines.append(f"  {'word pointed alone':<28} {'acc':>6} {'random':>7} {'other':>6} {'n':>6}")
        for word, rates in words.items():
            lines.append(
                f"  {word:<28} {rates['acc']:6.3f} {rates['random']:7.3f} {rates['other']:6.3f} {rates['n']:6g}"
            )
    print("\n".join(lines), file=sys.stderr)


def _cmd_eval(args: argparse.Namespace) -> int:
    from volta.eval.retrieval import evaluate_retrieval

    model, cfg, tokenizer, device, folder = _load(args)
    shards = _shards(args, cfg)
    what = args.eval_command
    grounding = what == "grounding" or (what == "all" and cfg.eval.grounding)
    result = _pass(model, cfg, tokenizer, device, shards, args, grounding=grounding)
    summary: dict[str, Any] = {
        "checkpoint": None if folder is None else str(folder),
        "model": f"random-init (seed {args.seed})" if args.random_init else "trained",
        "shards": shards,
        "samples": len(result.features),
    }
    notes: dict[str, str] = {}
    if what in ("retrieval", "all"):
        summary["retrieval"] = evaluate_retrieval(result.features, cfg.eval.retrieval_ks)
    if what == "all":
        summary["itm"] = result.itm.summary() or None
    if what in ("grounding", "all"):
        if result.grounding.count:
            summary["grounding"] = result.grounding.summary()
            summary["grounding_words"] = result.grounding.words()
        elif what == "grounding":
            raise UsageError(
                f"{shards}: no sample has JSON 'boxes' whose phrase occurs in its caption; grounding needs them"
            )
        else:
            summary["grounding"] = None
            notes["grounding"] = (
                "eval.grounding is off"
                if not cfg.eval.grounding
                else "no boxes whose phrase is in the caption"
            )
    if what in ("probe", "all"):
        try:
            summary["probe"] = _probe(model, cfg, tokenizer, device, result, shards, args)
        except ValueError as err:
            if what == "probe":
                raise UsageError(f"{shards}: linear probe impossible: {err}") from None
            summary["probe"] = None
            notes["probe"] = str(err)
    if notes:
        summary["notes"] = notes
    _print_table(summary)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _lines(path: Path) -> list[str]:
    """The non-blank lines of a text file that are not ``#`` comments, stripped."""
    return [
        ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]


def _classnames(value: str) -> list[str]:
    """``--classes``: a file with one class name per line, or names separated by commas."""
    path = Path(value)
    names = _lines(path) if path.is_file() else [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--classes {value}: no class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--classes {value}: class names repeated: {', '.join(repeated)}")
    return names


def _templates(value: str | None) -> list[str]:
    """``--templates``: a file with one prompt template per line, or one template; default: the built-in set."""
    from volta.eval.zeroshot import DEFAULT_TEMPLATES

    if value is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(value)
    if path.is_file():
        templates = _lines(path)
    elif "{}" in value:
        templates = [value]
    else:
        raise UsageError(f"--templates {value}: no such file (or a template with '{{}}' for the class name)")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UsageError(
            f"--templates {value}: every template needs '{{}}' for the class name ({bad[:1] or 'none'})"
        )
    return templates


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from volta.api import VoltaDualEncoder
    from volta.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

    classnames = _classnames(args.classes)
    templates = _templates(args.templates)
    model, cfg, tokenizer, _, folder = _load(args)
    shards = _shards(args, cfg)
    encoder = VoltaDualEncoder(model, cfg, tokenizer)
    classifier = zeroshot_classifier(encoder, encoder.tokenizer, classnames, templates)
    try:
        result = zeroshot_accuracy(
            encoder,
            classifier,
            classnames,
            shards,
            label_field=args.label_field,
            batch_size=args.batch_size,
            max_samples=args.max_samples or cfg.eval.max_samples,
        )
    except FileNotFoundError as err:
        raise UsageError(f"--shards: {err}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    summary: dict[str, Any] = {
        "checkpoint": None if folder is None else str(folder),
        "model": f"random-init (seed {args.seed})" if args.random_init else "trained",
        "shards": shards,
        "samples": int(result["n"]),
        "zeroshot": result,
        "class_names": classnames,
        "templates": len(templates),
    }
    _print_table(summary)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80] or "sample"


def _cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image

    from volta.data.factory import build_config_eval_loader
    from volta.eval.heatmap import batch_heatmap_rows, draw_heatmap_grid, render_heatmaps

    if (args.image is None) == (args.shards is None):
        raise UsageError("visualize: give either --image IMG --caption TEXT or --shards PATH [--num N]")
    if args.image is not None and not args.caption:
        raise UsageError("visualize: --image needs --caption TEXT")
    model, cfg, tokenizer, device, _ = _load(args)
    out = Path(args.out)
    if args.image is not None:
        try:
            with Image.open(args.image) as img:
                picture = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise UsageError(f"--image {args.image}: cannot read the image ({err})") from None
        if out.suffix.lower() != ".png":
            raise UsageError(f"--out {out}: expected a .png file for a single image")
        path = render_heatmaps(model, cfg, tokenizer, [picture], [args.caption], out, device=device)
        files = [str(path)]
    else:
        loader = build_config_eval_loader(
            cfg, tokenizer, args.shards, batch_size=min(args.num, cfg.eval.batch_size), max_samples=args.num
        )
        out.mkdir(parents=True, exist_ok=True)
        files = []
        try:
            for batch in loader:
                rows = batch_heatmap_rows(model, cfg, batch, device=device)
                for key, row in zip(batch.keys, rows):
                    path = out / f"{len(files):03d}_{_safe_name(key)}.png"
                    draw_heatmap_grid([row]).save(path, format="PNG")
                    files.append(str(path))
        except FileNotFoundError as err:
            raise UsageError(f"--shards: {err}") from None
        if not files:
            raise UsageError(f"{args.shards}: no usable sample to draw")
    print("\n".join(f"wrote {f}" for f in files), file=sys.stderr)
    json.dump({"files": files}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------------------------------------- parser
def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from volta.commands import add_config_arguments

    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder written by save_volta_checkpoint (or a file in it); required unless --random-init --config",
    )
    add_config_arguments(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (auto)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate a freshly initialised model of the checkpoint's config (the untrained baseline); without "
        "--checkpoint, of the --config recipe",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="seed of --random-init, the probe split and baseline (1)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``volta eval`` (retrieval, grounding, probe, all, zeroshot) and ``volta visualize`` to the parser."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint: retrieval, grounding, linear probe")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    helps = {
        "retrieval": "image-text recall@K from global features",
        "grounding": "pointing game from GOT plans against phrase boxes",
        "probe": "logistic-regression probe on frozen image features (JSON 'label')",
        "all": "retrieval, grounding and probe from one pass over the shards",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        _add_model_arguments(p)
        p.add_argument("--shards", default=None, help="evaluation shards (default: data.val_shards)")
        p.add_argument(
            "--max-samples", type=positive_int, default=None, help="cap (default: eval.max_samples)"
        )
        p.add_argument(
            "--batch-size", type=positive_int, default=None, help="batch size (default: eval.batch_size)"
        )
        if name in ("probe", "all"):
            p.add_argument(
                "--train-shards",
                default=None,
                help="probe training shards (default: split --shards by eval.probe_test_fraction)",
            )
        else:
            p.set_defaults(train_shards=None)
        p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "zeroshot", help="zero-shot top-1/top-5 accuracy from class-name prompts (JSON 'label')"
    )
    _add_model_arguments(p)
    p.add_argument("--shards", default=None, help="labelled evaluation shards (default: data.val_shards)")
    p.add_argument(
        "--classes", required=True, help="class names: a file (one per line) or a comma-separated list"
    )
    p.add_argument(
        "--templates",
        default=None,
        help="prompt templates with {} for the class name: a file (one per line) or one template "
        "(default: a small OpenCLIP-like set)",
    )
    p.add_argument(
        "--label-field",
        default="label",
        help="JSON field with each sample's class: an index into --classes or a class name (label)",
    )
    p.add_argument("--max-samples", type=positive_int, default=None, help="cap (default: eval.max_samples)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="batch size (default: eval.batch_size)"
    )
    p.set_defaults(func=_cmd_zeroshot)

    p = subparsers.add_parser("visualize", help="word-to-region heat maps from GOT transport plans (PNG)")
    _add_model_arguments(p)
    p.add_argument("--image", default=None, help="an image file (with --caption)")
    p.add_argument("--caption", default=None, help="the caption to align with --image")
    p.add_argument("--shards", default=None, help="draw validation samples with their boxes instead")
    p.add_argument("--num", type=positive_int, default=4, help="samples to draw from --shards (4)")
    p.add_argument("--out", required=True, help="PNG file (--image) or folder of PNGs (--shards)")
    p.set_defaults(func=_cmd_visualize)
