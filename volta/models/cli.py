"""``volta params`` (parameter budget of a recipe's model) and ``volta export`` (encoders from a checkpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from volta.config import load_config

log = logging.getLogger(__name__)


def _cmd_params(args: argparse.Namespace) -> int:
    import torch

    from volta.models.factory import build_model
    from volta.models.params import count_parameters, format_parameter_table

    cfg = load_config(args.config, args.overrides)
    # Built on the meta device: shapes only, no memory, no weight files, no download.
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=args.vocab_size)
    counts = count_parameters(model)
    counts["vocab_size"] = model.vocab_size
    print(format_parameter_table(counts), file=sys.stderr)
    json.dump(counts, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _load_tokenizer(name: str | None) -> Any:
    """The run's tokenizer when it is available without a download, else None (the export then names it)."""
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("tokenizer %r not available locally (%s); not copied into the export", name, err)
        return None


def _cmd_export(args: argparse.Namespace) -> int:
    from volta.errors import UsageError
    from volta.models.export import export_encoders, load_volta_checkpoint

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UsageError(f"--checkpoint {checkpoint}: no such checkpoint folder")
    try:
        model, cfg = load_volta_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    tokenizer = _load_tokenizer(args.tokenizer or cfg.tokenizer_name)
    paths = export_encoders(model.eval(), args.out, cfg, tokenizer=tokenizer)
    for name, path in paths.items():
        print(f"{name}: {path}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``params`` and ``export`` subcommands to the ``volta`` parser."""
    from volta.commands import add_config_arguments

    p = sub.add_parser(
        "params",
        help="parameter budget of a recipe's model by part (table on stderr, JSON on stdout; no download)",
    )
    add_config_arguments(p, required=True)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size (default: the text config's, e.g. 50265)",
    )
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "export", help="export the encoders of a volta checkpoint for timm / transformers (safetensors)"
    )
    p.add_argument("--checkpoint", required=True, help="a folder written by save_volta_checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer to copy (default: the run's, if available locally)"
    )
    p.set_defaults(func=_cmd_export)
