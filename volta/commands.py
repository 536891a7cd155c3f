"""What every ``volta`` subcommand module uses to declare its arguments (below ``volta.cli``, which imports them)."""

from __future__ import annotations

import argparse

__all__ = ["add_config_arguments", "non_negative_int", "positive_int"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """Add the shared ``--config RECIPE`` and repeated ``--set dotted.key=value`` options."""
    parser.add_argument("--config", "-c", required=required, help="recipe YAML (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set model.fusion_depth=4 (repeatable)",
    )
