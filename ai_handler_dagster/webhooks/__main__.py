"""Run the webhook receiver as a process: ``python -m ai_handler_dagster.webhooks --help``.

Reads ``AI_HANDLER_DATABASE_URL`` and ``AI_HANDLER_WEBHOOK_SECRET``. With ``--port 0`` it picks a
free port and, given ``--port-file``, writes it there once it accepts connections.
"""

from __future__ import annotations

import argparse
import sys

from ai_handler_dagster.settings import ConfigError
from ai_handler_dagster.webhooks.commands import add_serve_arguments, cmd_serve


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; 2 on a configuration error."""
    parser = argparse.ArgumentParser(
        prog="python -m ai_handler_dagster.webhooks",
        description="Receive Replicate's signed webhooks into the app database.",
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
