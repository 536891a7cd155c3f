"""The ``volta`` command: config, data, tokenizer, params, eval, visualize, export.

Each concern registers its own subcommands (a module with ``register(subparsers)``), listed in
``_COMMAND_MODULES``. Errors a user can fix (bad config, missing file) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from volta.commands import add_config_arguments
from volta.config import ConfigError, dump_config, load_config
from volta.errors import UsageError

log = logging.getLogger("volta")

# Modules that add subcommands: each defines register(subparsers: argparse._SubParsersAction) -> None.
_COMMAND_MODULES: tuple[str, ...] = (
    "volta.models.cli",
    "volta.data.cli",
    "volta.data.tokenizer_cli",
    "volta.dashboard",
    "volta.eval.cli",
    "volta.training.report",
    "volta.training.cli",
)


def _cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.action == "show":
        sys.stdout.write(dump_config(config))
    else:
        print(f"{args.config}: valid", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``volta`` with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="volta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate a recipe or print it fully resolved")
    p.add_argument("action", choices=["validate", "show"])
    add_config_arguments(p)
    p.set_defaults(func=_cmd_config)

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volta`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"volta: config error: {err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"volta: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run through the importable module so that `python -m volta.cli` and the console script share one
    # UsageError class (the command modules import it from volta.cli, not from __main__).
    from volta.cli import main as _main

    raise SystemExit(_main())
