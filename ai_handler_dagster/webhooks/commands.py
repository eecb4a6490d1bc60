"""``ai-handler webhooks serve|prune`` (and ``python -m ai_handler_dagster.webhooks``).

``serve`` runs the receiver in the foreground until SIGINT or SIGTERM, on the app database of
``AI_HANDLER_DATABASE_URL`` with the secret of ``AI_HANDLER_WEBHOOK_SECRET``. ``prune`` deletes
old deduplication rows and prediction states.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from ai_handler_dagster.webhooks.receiver import DEFAULT_TOLERANCE_S, WEBHOOK_PATH
from ai_handler_dagster.webhooks.store import RETENTION


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``serve`` (shared by the CLI and ``python -m``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE_S,
        help=f"seconds webhook-timestamp may differ from the clock (default {DEFAULT_TOLERANCE_S})",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve webhooks until SIGINT or SIGTERM; returns the exit code."""
    from ai_handler_dagster import settings
    from ai_handler_dagster.webhooks.config import webhook_secret
    from ai_handler_dagster.webhooks.receiver import start_receiver, write_port_file

    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    secret = webhook_secret()
    handle = start_receiver(
        settings.database_url(), secret, host=args.host, port=args.port, tolerance_s=args.tolerance
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        if args.port_file:
            write_port_file(args.port_file, handle.port)
        sys.stderr.write(f"webhook receiver listening on {handle.webhook_url}\n")
        sys.stderr.flush()
        stop.wait()
    finally:
        handle.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete deliveries and states older than ``--older-than-hours``."""
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.webhooks.store import prune

    deliveries, states = prune(make_engine(args.url), timedelta(hours=args.older_than_hours))
    sys.stdout.write(f"deleted {deliveries} webhook deliveries and {states} prediction states\n")
    return 0


def register(sub: Any) -> None:
    """Add ``webhooks serve`` and ``webhooks prune`` to the ``ai-handler`` subparsers."""
    webhooks = sub.add_parser(
        "webhooks", help=f"the Replicate webhook receiver ({WEBHOOK_PATH})"
    ).add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    serve = webhooks.add_parser(
        "serve",
        help="receive signed webhooks into the app database "
        "(AI_HANDLER_DATABASE_URL, AI_HANDLER_WEBHOOK_SECRET)",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)
    prune = webhooks.add_parser("prune", help="delete old webhook deliveries and states")
    prune.add_argument(
        "--older-than-hours",
        type=float,
        default=RETENTION.total_seconds() / 3600,
        help=f"age to keep (default {RETENTION.total_seconds() / 3600:.0f}, as reconciliation)",
    )
    prune.add_argument("--url", default=None, help="database URL (default: the app database)")
    prune.set_defaults(handler=cmd_prune)
