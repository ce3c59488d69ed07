"""The ``m2cache`` command. Each subcommand lives in ``m2cache.commands.<name>``
with ``add_parser(subparsers)`` and ``main(args) -> int``; this file only
dispatches and configures logging."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from m2cache.errors import M2CacheError

# Module names under m2cache.commands, in --help order.
COMMANDS = (
    "convert",
    "health",
    "run",
    "k8s",
    "serve",
    "train_predictor",
    "search_policy",
    "eval",
    "up",
    "generate",
    "status",
    "certs",
    "bench",
    "plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2cache", description="Serve LLMs larger than GPU memory.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"m2cache.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._main(args) or 0
    except M2CacheError as err:
        print(f"m2cache {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
