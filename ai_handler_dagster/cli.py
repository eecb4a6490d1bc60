"""``ai-handler``: the command line of the project.

Each subcommand is a small function; ``main`` parses arguments and maps known errors to a clear
message and a non-zero exit code (2 for bad input, 1 for a failed check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ai_handler_dagster.settings import ConfigError

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the command line: printed as ``error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ai-handler", description="Paid AI generations on Dagster."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _ = sub  # subcommands are registered below as the parts land
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
