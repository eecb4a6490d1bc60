"""``ai-handler serve`` (the HTTP API) and ``ai-handler keys create|list|revoke``.

``serve`` runs on the app database of ``AI_HANDLER_DATABASE_URL`` (migrated first with
``ai-handler db upgrade``) and the price table of ``AI_HANDLER_PRICING_FILE``. In production run
it behind an HTTPS proxy with ``--workers`` about the number of cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ai_handler_dagster.api.keys import SCOPES


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from ai_handler_dagster.api.server import serve

    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    serve(
        args.host,
        args.port,
        workers=args.workers,
        port_file=args.port_file,
        log_level=args.log_level,
    )
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from ai_handler_dagster.api import keys
    from ai_handler_dagster.db.engine import make_engine, session_scope

    with session_scope(make_engine(args.url)) as session:
        full, info = keys.create(
            session,
            name=args.name,
            scopes=args.scope or [],
            max_priority=args.max_priority,
            rate_per_minute=args.rate_per_minute,
        )
    if args.json:
        _say(json.dumps({**_info_dict(info), "key": full}))
    else:
        _say(full)
        sys.stderr.write(
            f"key {info.key_id} ({info.name}, scopes: {' '.join(info.scopes)}): shown once, "
            "keep it now\n"
        )
    return 0


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "key_id": info.key_id,
        "name": info.name,
        "scopes": list(info.scopes),
        "max_priority": info.max_priority,
        "rate_per_minute": info.rate_per_minute,
        "created_at": info.created_at.isoformat(),
        "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None,
    }


def cmd_keys_list(args: argparse.Namespace) -> int:
    from ai_handler_dagster.api import keys
    from ai_handler_dagster.db.engine import make_engine, session_scope

    with session_scope(make_engine(args.url)) as session:
        found = keys.list_keys(session)
    if args.json:
        _say(json.dumps([_info_dict(i) for i in found]))
        return 0
    for info in found:
        state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
        limits = []
        if info.max_priority is not None:
            limits.append(f"max priority {info.max_priority}")
        if info.rate_per_minute is not None:
            limits.append(f"{info.rate_per_minute}/min")
        _say(
            "\t".join(
                [info.key_id, info.name, " ".join(info.scopes), state, ", ".join(limits) or "-"]
            )
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from ai_handler_dagster.api import keys
    from ai_handler_dagster.db.engine import make_engine, session_scope

    with session_scope(make_engine(args.url)) as session:
        info = keys.revoke(session, args.key_id)
    assert info.revoked_at is not None
    _say(f"key {info.key_id} ({info.name}) revoked at {info.revoked_at.isoformat()}")
    return 0


def _priority(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number from 0 to 9, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def register(sub: Any) -> None:
    """Add ``serve`` and ``keys create|list|revoke`` to the ``ai-handler`` subparsers."""
    serve = sub.add_parser("serve", help="the HTTP API for applications (and Replicate's webhooks)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    serve.add_argument("--workers", type=_positive, default=1, help="worker processes")
    serve.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    serve.add_argument("--log-level", default="info", help="logging level (default info)")
    serve.set_defaults(handler=cmd_serve)

    keys_cmd = sub.add_parser("keys", help="API keys of the HTTP API").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )

    def with_url(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=None,
            help="database URL (default: AI_HANDLER_DATABASE_URL, else the embedded SQLite file)",
        )

    create = keys_cmd.add_parser("create", help="create a key; prints it once")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="a scope the key has (repeat for several): read, submit, admin (every scope)",
    )
    create.add_argument(
        "--max-priority", type=_priority, help="highest priority its requests may ask for"
    )
    create.add_argument(
        "--rate-per-minute",
        type=_positive,
        help="requests a minute (default AI_HANDLER_API_RATE_PER_MIN)",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    with_url(create)
    create.set_defaults(handler=cmd_keys_create)
    list_cmd = keys_cmd.add_parser("list", help="every key (never their secrets)")
    list_cmd.add_argument("--json", action="store_true", help="print JSON")
    with_url(list_cmd)
    list_cmd.set_defaults(handler=cmd_keys_list)
    revoke = keys_cmd.add_parser("revoke", help="refuse a key from its next request on")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (or the whole key)")
    with_url(revoke)
    revoke.set_defaults(handler=cmd_keys_revoke)
