"""``ai-handler``: the command line of the project.

Each subcommand is a small function; ``main`` parses arguments and maps known errors to a clear
``error: ...`` message and an exit code: 2 for bad input (any ``AiHandlerError``: a usage
error, a refused request, an unknown user), 1 for a failed check, an unusable database or a
``GenerationError`` (the provider or a step failed). Anything else is a bug: its traceback shows.

Commands of this module: ``db upgrade``, ``ledger verify``, ``credits grant|show``, ``submit``,
``status``, ``cancel``, ``demo`` and ``instance write``. The other parts keep their commands in
their own modules, each with a ``register(subparsers)`` that adds its subparsers (each with
``set_defaults(handler=...)``, a function from the parsed arguments to an exit code).
:func:`build_parser` imports those modules by name and calls every ``register``:
``devstack.commands`` (``dev``), ``proving.bench`` (``bench``), ``webhooks.commands``
(``webhooks serve|prune``), ``proving.chaos`` (``chaos``), ``priorities``
(``priority set|unset|list``), ``usage`` (``usage``) and ``api.commands`` (``serve``,
``keys create|list|revoke``). It imports them itself, not at the top
of this module, so that importing the module stays cheap; each handler imports what it runs
(Dagster included) only when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster.errors import AiHandlerError, GenerationError

Handler = Callable[[argparse.Namespace], int]


class UsageError(AiHandlerError):
    """Bad input from the command line: printed as ``error: ...`` with exit code 2."""


def _display_url(url: str | sa.URL) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


# --- db ---------------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate the app database to the newest schema."""
    from ai_handler_dagster import db, settings

    url = args.url or settings.database_url()
    revision = db.upgrade(url)
    print(f"database {_display_url(url)} is at revision {revision} (head {db.head_revision()})")
    return 0


# --- ledger -----------------------------------------------------------------------------------


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """Check every ledger invariant and the agreement of generations with their holds."""
    from ai_handler_dagster import generations, ledger
    from ai_handler_dagster.db.engine import make_engine, session_scope
    from ai_handler_dagster.db.models import Account, Generation, Hold, LedgerEntry

    with session_scope(make_engine(args.url)) as session:
        violations = [*ledger.verify(session), *generations.verify(session)]

        def count(model: type[Any]) -> int:
            return int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)

        sizes = (
            f"{count(Account)} accounts, {count(Hold)} holds, {count(LedgerEntry)} entries, "
            f"{count(Generation)} generations"
        )
    if violations:
        print(f"ledger verify: {len(violations)} violation(s) ({sizes} checked)")
        for violation in violations:
            print(f"  - {violation}")
        return 1
    print(f"ledger OK: {sizes} checked")
    return 0


# --- credits ----------------------------------------------------------------------------------


def _parse_amount(text: str) -> int:
    # Only plain digits: "1e3", "10.0" or "-5" are mistakes worth refusing, not guessing.
    if not text.isascii() or not text.isdigit():
        raise UsageError(f"AMOUNT must be a whole number of credits, got {text!r}")
    return int(text)


def _balance_line(user: str, balance: Any) -> str:
    return f"{user}: balance {balance.balance}, held {balance.held}, available {balance.available}"


def cmd_credits_grant(args: argparse.Namespace) -> int:
    """Add credits to a user's balance (idempotent with ``--key``)."""
    from ai_handler_dagster import ledger
    from ai_handler_dagster.db.engine import make_engine, session_scope

    amount = _parse_amount(args.amount)
    # Without --key every invocation is a new grant; with it, a repeat is a no-op.
    key = args.key or f"cli:{uuid.uuid4().hex}"
    with session_scope(make_engine(args.url)) as session:
        entry = ledger.grant(session, args.user, amount, key, memo=args.memo)
        balance = ledger.balance(session, args.user)
    print(f"granted {entry.amount} credits (entry {entry.id}, key {key})")
    print(_balance_line(args.user, balance))
    return 0


def cmd_credits_show(args: argparse.Namespace) -> int:
    """Print a user's balance, held and available credits."""
    from ai_handler_dagster import ledger
    from ai_handler_dagster.db.engine import make_engine, session_scope

    with session_scope(make_engine(args.url)) as session:
        balance = ledger.balance(session, args.user)
    if args.json:
        print(json.dumps({"user": args.user, **dataclasses.asdict(balance)}))
    else:
        print(_balance_line(args.user, balance))
    return 0


# --- generations ------------------------------------------------------------------------------


def _parse_input(text: str) -> Any:
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"cannot read input file {str(path)!r}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"input file {str(path)!r} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} "
                f"at offset {exc.start})"
            ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a generation request; prints its id."""
    from ai_handler_dagster import generations
    from ai_handler_dagster.db.engine import make_engine, session_scope
    from ai_handler_dagster.pricing import load_pricing

    payload = _parse_input(args.input)
    priority = None
    if args.priority is not None:
        if not args.priority.isascii() or not args.priority.isdigit():
            raise UsageError(f"--priority must be a whole number, got {args.priority!r}")
        priority = int(args.priority)
    prices = load_pricing()
    with session_scope(make_engine(args.url)) as session:
        row = generations.submit(
            session,
            user_id=args.user,
            model=args.model,
            input=payload,
            request_id=args.request_id,
            prices=prices,
            priority=priority,
        )
    print(row.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print a generation as JSON."""
    from ai_handler_dagster import generations
    from ai_handler_dagster.db.engine import make_engine, session_scope

    if not args.id.isascii() or not args.id.isdigit():
        raise UsageError(f"ID must be a generation id (a whole number), got {args.id!r}")
    with session_scope(make_engine(args.url)) as session:
        row = generations.get(session, int(args.id))
        data = generations.as_dict(row)
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a generation (and its prediction at the provider); prints the generation."""
    from ai_handler_dagster.cancel import cancel_generation, provider_client
    from ai_handler_dagster.db.engine import make_engine

    if not args.id.isascii() or not args.id.isdigit():
        raise UsageError(f"ID must be a generation id (a whole number), got {args.id!r}")
    result = cancel_generation(make_engine(args.url), int(args.id), client=provider_client())
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
        return 0
    row = result.generation
    how = "canceled" if result.changed else "was already canceled"
    print(f"generation {row['id']} {how}; hold {row['hold_id']} released")
    if result.prediction_id:
        print(f"prediction {result.prediction_id}: cancel {result.provider}")
    return 0


# --- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo on the embedded stack (see ``demo.py``)."""
    from ai_handler_dagster.demo import main_demo

    return main_demo(json_output=args.json, timeout_s=args.timeout)


# --- instance ---------------------------------------------------------------------------------


def cmd_instance_write(args: argparse.Namespace) -> int:
    """Write production's Dagster instance folder: the shipped settings, PostgreSQL storage."""
    from ai_handler_dagster import instance

    home = Path(args.dir)
    target = home / "dagster.yaml"
    if target.exists() and not args.force:
        raise UsageError(f"{target} exists; pass --force to write it again")
    instance.write(home, instance.production_config())
    print(f"wrote {target}: dagster.yaml's settings, storage from ${instance.PG_URL_VAR}")
    print(f"run Dagster with DAGSTER_HOME={home.resolve()} and {instance.PG_URL_VAR} set")
    return 0


# --- parser -----------------------------------------------------------------------------------


def _with_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="database URL (default: AI_HANDLER_DATABASE_URL, else the embedded SQLite file)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, this module's and the other parts'."""
    from ai_handler_dagster import priorities, usage
    from ai_handler_dagster.api import commands as api_commands
    from ai_handler_dagster.devstack import commands as devstack_commands
    from ai_handler_dagster.proving import bench, chaos
    from ai_handler_dagster.webhooks import commands as webhooks_commands

    parser = argparse.ArgumentParser(
        prog="ai-handler", description="Paid AI generations on Dagster."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="app database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    upgrade = db.add_parser("upgrade", help="migrate the app database to the newest schema")
    _with_url(upgrade)
    upgrade.set_defaults(handler=cmd_db_upgrade)

    ledger_cmd = sub.add_parser("ledger", help="credit ledger").add_subparsers(
        dest="ledger_command", required=True, metavar="ACTION"
    )
    verify = ledger_cmd.add_parser("verify", help="check every ledger invariant (exit 1 if broken)")
    _with_url(verify)
    verify.set_defaults(handler=cmd_ledger_verify)

    credits = sub.add_parser("credits", help="user credits").add_subparsers(
        dest="credits_command", required=True, metavar="ACTION"
    )
    grant = credits.add_parser("grant", help="add credits to a user (creates the account)")
    grant.add_argument("user", metavar="USER")
    grant.add_argument("amount", metavar="AMOUNT")
    grant.add_argument("--key", help="idempotency key: repeating a grant with it has no effect")
    grant.add_argument("--memo", help="why the credits were granted")
    _with_url(grant)
    grant.set_defaults(handler=cmd_credits_grant)
    show = credits.add_parser("show", help="a user's balance, held and available credits")
    show.add_argument("user", metavar="USER")
    show.add_argument("--json", action="store_true", help="print JSON")
    _with_url(show)
    show.set_defaults(handler=cmd_credits_show)

    submit = sub.add_parser("submit", help="submit a generation request (prints its id)")
    submit.add_argument("--user", required=True)
    submit.add_argument(
        "--model", required=True, help="owner/name, owner/name:version or deployment:owner/name"
    )
    submit.add_argument(
        "--input",
        required=True,
        help='model input as a JSON object, or @FILE (e.g. \'{"prompt": "a fox"}\')',
    )
    submit.add_argument("--request-id", help="client idempotency key: a repeat returns the same id")
    submit.add_argument(
        "--priority",
        metavar="N",
        help="higher is claimed first; at most the user's ceiling (default: that ceiling)",
    )
    _with_url(submit)
    submit.set_defaults(handler=cmd_submit)

    status = sub.add_parser("status", help="print a generation as JSON")
    status.add_argument("id", metavar="ID")
    _with_url(status)
    status.set_defaults(handler=cmd_status)

    cancel = sub.add_parser(
        "cancel", help="cancel a generation: release its hold, cancel its prediction"
    )
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--json", action="store_true", help="print the result as JSON")
    _with_url(cancel)
    cancel.set_defaults(handler=cmd_cancel)

    demo = sub.add_parser("demo", help="run the demo on the embedded stack")
    demo.add_argument("--json", action="store_true", help="also print the result as JSON")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    demo.set_defaults(handler=cmd_demo)

    inst = sub.add_parser("instance", help="Dagster instance folders").add_subparsers(
        dest="instance_command", required=True, metavar="ACTION"
    )
    write = inst.add_parser(
        "write",
        help="write DIR/dagster.yaml for production: the repository's dagster.yaml plus "
        "PostgreSQL storage from DAGSTER_PG_URL (then set DAGSTER_HOME=DIR)",
    )
    write.add_argument("dir", metavar="DIR")
    write.add_argument("--force", action="store_true", help="replace an existing dagster.yaml")
    write.set_defaults(handler=cmd_instance_write)

    devstack_commands.register(sub)
    bench.register(sub)
    webhooks_commands.register(sub)
    chaos.register(sub)
    priorities.register(sub)
    usage.register(sub)
    api_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse errors included, never raises them)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed by argparse (2)
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except GenerationError as exc:  # the provider or a step failed: not the input's fault
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AiHandlerError as exc:  # the project's own refusals; anything else is a bug
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except sa.exc.DBAPIError as exc:
        # Typically a database that was never migrated, or a server that is down.
        print(
            f"error: database error: {str(exc.orig).strip() or exc}\n"
            "  (is the database reachable, and migrated with `ai-handler db upgrade`?)",
            file=sys.stderr,
        )
        return 1


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SIGTERM (timeout, process managers, CI) unwinds like Ctrl-C, so every command that started
    # an embedded stack stops its processes in its `finally` instead of leaving them behind.
    raise SystemExit(128 + signum)


def run() -> None:
    """Console entry point: ``main`` with SIGTERM turned into a clean exit."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())


if __name__ == "__main__":
    run()
