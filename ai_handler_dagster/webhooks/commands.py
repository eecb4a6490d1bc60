"""``ai-handler webhooks prune``: delete old deduplication rows and prediction states.

Webhooks themselves are received by the HTTP API (``ai-handler serve``, route
``POST /webhooks/replicate``); reconciliation also prunes on its schedule.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any

from ai_handler_dagster.webhooks.receiver import WEBHOOK_PATH
from ai_handler_dagster.webhooks.store import RETENTION


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete deliveries and states older than ``--older-than-hours``."""
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.webhooks.store import prune

    deliveries, states = prune(make_engine(args.url), timedelta(hours=args.older_than_hours))
    sys.stdout.write(f"deleted {deliveries} webhook deliveries and {states} prediction states\n")
    return 0


def register(sub: Any) -> None:
    """Add ``webhooks prune`` to the ``ai-handler`` subparsers."""
    webhooks = sub.add_parser(
        "webhooks",
        help=f"what Replicate's webhooks recorded (received by `serve` at {WEBHOOK_PATH})",
    ).add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    prune = webhooks.add_parser("prune", help="delete old webhook deliveries and states")
    prune.add_argument(
        "--older-than-hours",
        type=float,
        default=RETENTION.total_seconds() / 3600,
        help=f"age to keep (default {RETENTION.total_seconds() / 3600:.0f}, as reconciliation)",
    )
    prune.add_argument("--url", default=None, help="database URL (default: the app database)")
    prune.set_defaults(handler=cmd_prune)
