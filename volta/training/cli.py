"""``volta train``: pre-train in this process (the run itself is :mod:`volta.training.local`, imported only when the
command runs, so that ``volta --help`` does not load torch)."""

from __future__ import annotations

import argparse
from typing import Any

from volta.errors import UsageError

__all__ = ["register"]


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from volta.config import load_config
    from volta.training.local import train_local

    config = load_config(args.config, args.overrides)
    if config.train.precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train: train.precision=fp16 needs a GPU; use bf16 or fp32")
    run = train_local(config)
    print(run.out_dir)
    return 0


def register(sub: Any) -> None:
    """Add ``volta train`` to the ``volta`` command."""
    from volta.commands import add_config_arguments

    p = sub.add_parser(
        "train", help="pre-train in this process (no Ray, no DeepSpeed); resumes from checkpoints"
    )
    add_config_arguments(p, required=True)
    p.set_defaults(func=_cmd_train)
