"""`sbir`: the one command-line front door. Each stage's package adds its own subcommands.

Heavy imports (torch, faiss, fastapi) happen inside the command functions, so `sbir --help` is
instant. A package contributes `add_commands(subparsers)`; each command sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from model.ground import __version__
from model.ground.errors import UserError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "model.data.commands",
    "model.commands",
    "index_builder.commands",
    "service.commands",
    "sbir.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbir",
        description="Zero-shot sketch-based image retrieval (IIAE on a frozen ImageNet backbone).",
    )
    parser.add_argument("--version", action="version", version=f"sbir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that stage is not part of this checkout yet
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"sbir {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
