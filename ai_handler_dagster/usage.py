"""``ai-handler usage``: what each user, model and day cost us and earned, per settled attempt.

One line per (day, user, model): how many generation attempts settled, how many were captured
(succeeded) and how many refunded, the credits charged, what the provider charged us and the
margin (credits charged x ``AI_HANDLER_CREDIT_VALUE_USD`` - provider cost).

- Every attempt that asked the provider for a prediction counts (``create_attempts`` keeps one
  row per attempt for good), so a requeued generation counts once per attempt, each billed by
  the provider; an attempt still holding its credits (in flight) is left out until it settles.
- Credits charged come from the ledger: the capture entry of the attempt's hold (key
  ``gen:<id>:a<attempt>:hold``), the truth of what the user paid; a refunded attempt charged 0.
- The provider's cost is the one recorded on the attempt when its prediction finished
  (``generations.record_provider_cost``; reconciliation records those a dead run never saw
  end). An attempt without one (its model has no provider price, the prediction reported no
  measure, or reconciliation has not priced it yet) is counted in ``cost_unknown`` and adds
  nothing.
- The day is the UTC day the attempt first asked the provider (``create_attempts.started_at``,
  indexed), so a line never moves once its attempts have settled.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster.db.models import CreateAttempt, Generation, Hold, LedgerEntry
from ai_handler_dagster.domain import EntryKind, HoldStatus
from ai_handler_dagster.errors import AiHandlerError
from ai_handler_dagster.provider_costs import format_usd, nano_to_usd

__all__ = ["UsageLine", "format_table", "register", "usage_lines"]


@dataclass
class UsageLine:
    """The settled attempts of one user and model on one day, summed."""

    day: date
    user_id: str
    model: str
    count: int = 0
    succeeded: int = 0
    refunded: int = 0
    credits_charged: int = 0
    provider_cost_nusd: int = 0
    cost_unknown: int = 0

    def margin_usd(self, credit_value: Decimal) -> Decimal:
        """Credits charged times the value of a credit, less the provider costs known."""
        return self.credits_charged * credit_value - nano_to_usd(self.provider_cost_nusd)

    def as_json(self, credit_value: Decimal) -> dict[str, Any]:
        """JSON-ready, with USD as exact decimal strings."""
        return {
            "day": self.day.isoformat(),
            "user": self.user_id,
            "model": self.model,
            "count": self.count,
            "succeeded": self.succeeded,
            "refunded": self.refunded,
            "credits_charged": self.credits_charged,
            "credits_charged_usd": str(self.credits_charged * credit_value),
            "provider_cost_usd": str(nano_to_usd(self.provider_cost_nusd)),
            "provider_cost_nusd": self.provider_cost_nusd,
            "cost_unknown": self.cost_unknown,
            "margin_usd": str(self.margin_usd(credit_value)),
        }


def _hold_key_sql() -> sa.ColumnElement[str]:
    # generations.hold_key(id, attempt), spelled in SQL for the join (same on both databases).
    return (
        sa.literal("gen:")
        + sa.cast(CreateAttempt.generation_id, sa.String)
        + sa.literal(":a")
        + sa.cast(CreateAttempt.attempt, sa.String)
        + sa.literal(":hold")
    )


def usage_lines(
    session: Session,
    *,
    since: date | None = None,
    until: date | None = None,
    users: Sequence[str] = (),
    models: Sequence[str] = (),
) -> list[UsageLine]:
    """The lines of settled attempts from day ``since`` to day ``until`` (both included, UTC),
    of the given users and models (all when empty), ordered by day, user and model."""
    captured = (
        sa.select(LedgerEntry.hold_id, sa.func.sum(LedgerEntry.amount).label("credits"))
        .where(LedgerEntry.kind == EntryKind.CAPTURE)
        .group_by(LedgerEntry.hold_id)
        .subquery()
    )
    query = (
        sa.select(
            CreateAttempt.started_at,
            Generation.user_id,
            CreateAttempt.model,
            CreateAttempt.provider_cost_nusd,
            Hold.status,
            captured.c.credits,
        )
        .join(Generation, Generation.id == CreateAttempt.generation_id)
        .outerjoin(Hold, Hold.idempotency_key == _hold_key_sql())
        .outerjoin(captured, captured.c.hold_id == Hold.id)
        .where(sa.or_(Hold.id.is_(None), Hold.status != HoldStatus.PENDING))
    )
    if since is not None:
        query = query.where(CreateAttempt.started_at >= datetime.combine(since, time(), UTC))
    if until is not None:
        end = datetime.combine(until + timedelta(days=1), time(), UTC)
        query = query.where(CreateAttempt.started_at < end)
    if users:
        query = query.where(Generation.user_id.in_(list(users)))
    if models:
        query = query.where(CreateAttempt.model.in_(list(models)))
    lines: dict[tuple[date, str, str], UsageLine] = {}
    for started, user, model, cost, hold_status, credits in session.execute(
        query.execution_options(yield_per=1000)
    ):
        day = started.astimezone(UTC).date()
        line = lines.get((day, user, model))
        if line is None:
            line = lines[(day, user, model)] = UsageLine(day, user, model)
        line.count += 1
        if hold_status == HoldStatus.CAPTURED:
            line.succeeded += 1
        else:
            line.refunded += 1
        line.credits_charged += int(credits or 0)
        if cost is None:
            line.cost_unknown += 1
        else:
            line.provider_cost_nusd += int(cost)
    return [lines[key] for key in sorted(lines)]


def total(lines: Iterable[UsageLine]) -> UsageLine:
    """Every line summed (day, user and model of the first line; blank when none)."""
    lines = list(lines)
    first = lines[0] if lines else UsageLine(date.min, "", "")
    out = UsageLine(first.day, "", "")
    for line in lines:
        out.count += line.count
        out.succeeded += line.succeeded
        out.refunded += line.refunded
        out.credits_charged += line.credits_charged
        out.provider_cost_nusd += line.provider_cost_nusd
        out.cost_unknown += line.cost_unknown
    return out


_COLUMNS = (
    "day",
    "user",
    "model",
    "count",
    "ok",
    "refunded",
    "credits",
    "credits_usd",
    "provider_usd",
    "margin_usd",
    "cost_unknown",
)
#: Columns aligned to the right (numbers).
_NUMERIC = set(_COLUMNS[3:])


def format_table(lines: Sequence[UsageLine], credit_value: Decimal) -> str:
    """A plain-text table with a total line; USD rounded to 6 decimals for display."""

    def cells(line: UsageLine, day: str, user: str, model: str) -> list[str]:
        return [
            day,
            user,
            model,
            str(line.count),
            str(line.succeeded),
            str(line.refunded),
            str(line.credits_charged),
            format_usd(line.credits_charged * credit_value),
            format_usd(line.provider_cost_nusd, nano=True),
            format_usd(line.margin_usd(credit_value)),
            str(line.cost_unknown),
        ]

    body = [cells(line, line.day.isoformat(), line.user_id, line.model) for line in lines]
    rows = [list(_COLUMNS), *body, cells(total(lines), "total", "", "")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def render(row: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if name in _NUMERIC else cell.ljust(w)
            for cell, w, name in zip(row, widths, _COLUMNS, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(rows[0]), rule, *map(render, body), rule, render(rows[-1])])


# --- the command ------------------------------------------------------------------------------


class BadDay(AiHandlerError):
    """A ``--since``/``--until`` that is not a day (``YYYY-MM-DD``)."""


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadDay(f"{text!r} is not a day (YYYY-MM-DD)") from None


def cmd_usage(args: argparse.Namespace) -> int:
    """Print the usage lines as a table, or as JSON with ``--json``."""
    from ai_handler_dagster import settings
    from ai_handler_dagster.db.engine import make_engine, session_scope

    since = _day(args.since) if args.since else None
    until = _day(args.until) if args.until else None
    if since and until and until < since:
        raise BadDay(f"--until {until} is before --since {since}")
    credit_value = settings.credit_value_usd()
    with session_scope(make_engine(args.url)) as session:
        lines = usage_lines(
            session, since=since, until=until, users=args.user or (), models=args.model or ()
        )
    if args.json:
        report = {
            "credit_value_usd": str(credit_value),
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "lines": [line.as_json(credit_value) for line in lines],
            "total": {
                key: value
                for key, value in total(lines).as_json(credit_value).items()
                if key not in ("day", "user", "model")
            },
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    span = f"{since or 'the start'} to {until or 'today'}"
    sys.stdout.write(
        f"usage from {span} (UTC days), settled attempts; 1 credit = USD {credit_value} "
        f"({settings.CREDIT_VALUE_VAR}); margin = credits_usd - provider_usd\n"
    )
    sys.stdout.write(format_table(lines, credit_value) + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``usage`` to the CLI's subparsers."""
    usage = sub.add_parser(
        "usage",
        help="per user, model and day: attempts, credits charged, provider cost and margin",
    )
    usage.add_argument("--since", metavar="DAY", help="first UTC day included (YYYY-MM-DD)")
    usage.add_argument("--until", metavar="DAY", help="last UTC day included (YYYY-MM-DD)")
    usage.add_argument(
        "--user", action="append", metavar="USER", help="only this user (repeatable)"
    )
    usage.add_argument(
        "--model", action="append", metavar="MODEL", help="only this model reference (repeatable)"
    )
    usage.add_argument("--json", action="store_true", help="print JSON (exact decimal USD)")
    usage.add_argument(
        "--url",
        default=None,
        help="database URL (default: AI_HANDLER_DATABASE_URL, else the embedded SQLite file)",
    )
    usage.set_defaults(handler=cmd_usage)
