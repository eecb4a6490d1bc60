"""Who may ask for which priority: the operator's ceilings, and ``ai-handler priority``.

A generation's priority is a whole number from ``MIN_PRIORITY`` (0) to ``MAX_PRIORITY`` (9);
the request sensor claims higher priorities first (``generations.claim_pending``). A requester
never picks a priority on its own authority: the operator gives each user a ceiling (a tier) in
``user_priorities`` with ``ai-handler priority set USER N``; a user not listed has
``AI_HANDLER_DEFAULT_PRIORITY`` (default 0). A request that names no priority gets the user's
ceiling, one that names a higher one is refused (``PriorityRefused``) and nothing is written,
one that names a lower one (a paid user's background work) keeps it.

:func:`ceiling` is the one place that decides a requester's ceiling: API keys, once they
exist, narrow it here (the lower of the user's and the key's).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import settings
from ai_handler_dagster.db.models import UserPriority
from ai_handler_dagster.domain import MAX_PRIORITY, MIN_PRIORITY, check_identifier
from ai_handler_dagster.errors import AiHandlerError

__all__ = [
    "LISTED_CEILING",
    "PriorityRefused",
    "ceiling",
    "ceiling_of",
    "check_priority",
    "listed",
    "register",
    "resolve",
    "resolve_under",
    "set_ceiling",
    "unset_ceiling",
]


class PriorityRefused(AiHandlerError, ValueError):
    """A priority that is not a whole number in range, or above what the requester may ask."""


def check_priority(value: object, what: str = "priority") -> int:
    """``value`` if it is a whole number from ``MIN_PRIORITY`` to ``MAX_PRIORITY``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PriorityRefused(
            f"{what} must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}, got {value!r}"
        )
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise PriorityRefused(f"{what} must be from {MIN_PRIORITY} to {MAX_PRIORITY}, got {value}")
    return value


#: The operator's ceiling for a user (None: not listed), as a scalar subquery a caller can put
#: in its own statement (``generations.submission`` reads it with the account it locks).
LISTED_CEILING = (
    sa.select(UserPriority.max_priority)
    .where(UserPriority.user_id == sa.bindparam("user_id"))
    .scalar_subquery()
)
_CEILING = sa.select(LISTED_CEILING)


def ceiling_of(listed_value: int | None) -> int:
    """The ceiling of a user whose ``user_priorities`` value is ``listed_value`` (None: the
    user is not listed, so ``AI_HANDLER_DEFAULT_PRIORITY``)."""
    return settings.default_priority() if listed_value is None else int(listed_value)


def ceiling(session: Session, user_id: str) -> int:
    """The highest priority ``user_id`` may ask for (and gets when asking none): the operator's
    value for the user, else ``AI_HANDLER_DEFAULT_PRIORITY``."""
    session.flush()  # as a query through the session would (autoflush)
    return ceiling_of(session.connection().execute(_CEILING, {"user_id": user_id}).scalar())


def resolve(session: Session, user_id: str, requested: object | None) -> int:
    """The priority a request of ``user_id`` runs at: ``requested``, or the user's ceiling when
    it is None. ``PriorityRefused`` (nothing written) if it is out of range or above the
    ceiling."""
    return resolve_under(ceiling(session, user_id), user_id, requested)


def resolve_under(allowed: int, user_id: str, requested: object | None) -> int:
    """``resolve`` for a user whose ceiling is already known to be ``allowed``."""
    if requested is None:
        return allowed
    value = check_priority(requested)
    if value > allowed:
        raise PriorityRefused(
            f"priority {value} is above the highest {user_id!r} may ask for ({allowed}; the "
            "operator sets it with `ai-handler priority set`)"
        )
    return value


def set_ceiling(session: Session, user_id: str, value: object) -> UserPriority:
    """Give ``user_id`` the ceiling ``value`` (replacing any earlier one). Requests already
    submitted keep their priority."""
    user_id = check_identifier(user_id, "user", error=PriorityRefused)
    value = check_priority(value, "the ceiling")
    row = session.get(UserPriority, user_id, with_for_update=True)
    if row is None:
        row = UserPriority(user_id=user_id, max_priority=value)
        session.add(row)
    else:
        row.max_priority = value
    session.flush()
    return row


def unset_ceiling(session: Session, user_id: str) -> bool:
    """Forget ``user_id``'s ceiling (back to the default); False if none was set."""
    row = session.get(UserPriority, user_id, with_for_update=True)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def listed(session: Session) -> list[UserPriority]:
    """Every user with a ceiling, by user id."""
    return list(session.scalars(sa.select(UserPriority).order_by(UserPriority.user_id)))


# --- ai-handler priority ----------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _parse_priority(text: str) -> int:
    # Only plain digits, as for credit amounts: "1.0" or "+3" are mistakes worth refusing.
    if not text.isascii() or not text.isdigit():
        raise PriorityRefused(
            f"N must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}, got {text!r}"
        )
    return int(text)


def cmd_set(args: argparse.Namespace) -> int:
    """``priority set USER N``."""
    from ai_handler_dagster.db.engine import make_engine, session_scope

    value = _parse_priority(args.priority)
    with session_scope(make_engine(args.url)) as session:
        row = set_ceiling(session, args.user, value)
        _say(f"{row.user_id}: highest priority {row.max_priority}")
    return 0


def cmd_unset(args: argparse.Namespace) -> int:
    """``priority unset USER``."""
    from ai_handler_dagster.db.engine import make_engine, session_scope

    with session_scope(make_engine(args.url)) as session:
        removed = unset_ceiling(session, args.user)
    default = settings.default_priority()
    state = "removed" if removed else "was not set"
    _say(f"{args.user}: ceiling {state}; the default applies ({default})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``priority list``: every listed user's ceiling, and the default for the others."""
    from ai_handler_dagster.db.engine import make_engine, session_scope

    default = settings.default_priority()
    with session_scope(make_engine(args.url)) as session:
        rows = [(r.user_id, r.max_priority) for r in listed(session)]
    if args.json:
        _say(json.dumps({"default": default, "users": dict(rows)}))
        return 0
    for user, value in rows:
        _say(f"{user}\t{value}")
    _say(f"(every other user: {default}, AI_HANDLER_DEFAULT_PRIORITY)")
    return 0


def register(sub: Any) -> None:
    """Add ``priority set|unset|list`` to the ``ai-handler`` subparsers."""
    priority = sub.add_parser(
        "priority", help=f"each user's highest priority ({MIN_PRIORITY}-{MAX_PRIORITY})"
    ).add_subparsers(dest="priority_command", required=True, metavar="ACTION")

    def with_url(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=None,
            help="database URL (default: AI_HANDLER_DATABASE_URL, else the embedded SQLite file)",
        )

    set_cmd = priority.add_parser(
        "set", help="the highest priority USER may ask for, and gets when asking none"
    )
    set_cmd.add_argument("user", metavar="USER")
    set_cmd.add_argument("priority", metavar="N")
    with_url(set_cmd)
    set_cmd.set_defaults(handler=cmd_set)
    unset = priority.add_parser("unset", help="USER goes back to AI_HANDLER_DEFAULT_PRIORITY")
    unset.add_argument("user", metavar="USER")
    with_url(unset)
    unset.set_defaults(handler=cmd_unset)
    list_cmd = priority.add_parser("list", help="every user's ceiling, and the default")
    list_cmd.add_argument("--json", action="store_true", help="print JSON")
    with_url(list_cmd)
    list_cmd.set_defaults(handler=cmd_list)
