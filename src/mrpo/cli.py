"""The `mrpo` command line: argument parsing that hands each subcommand to its pipeline step."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mrpo import __version__

DESCRIPTION = """\
Multi-Reference Preference Optimization: train a policy on preference pairs against any number of
reference models (of any family and tokenizer), whose log-probs are precomputed once and cached.
"""

Subcommand = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrpo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mrpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(subparsers)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
