"""The generation event log: one row per state change, in the transaction that made it.

Every change of a generation's ``status`` (or of its ``attempt``, a requeue) appends a
``generation_events`` row in the same flush, hence the same transaction: an event exists exactly
when its change committed. It is written by an ORM ``after_flush`` listener rather than by each
transition, so a new transition cannot forget it; every transition lives in ``generations.py``,
which installs it when imported, so the listener is installed wherever a generation can change.
Rows an application inserts with SQL (not through the ORM) get their first event when the
request sensor claims them (``queued``). ``generations.submission`` writes a new generation with
Core statements, its ``pending`` event (``FIRST_EVENT``) among them.

The HTTP API reads the log for a generation's history; streams resume from an event id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from ai_handler_dagster.db.models import Generation, GenerationEvent, utcnow
from ai_handler_dagster.domain import GenerationStatus


def _changed(row: Generation) -> bool:
    state = sa.inspect(row)
    return bool(
        state.attrs.status.history.has_changes() or state.attrs.attempt.history.has_changes()
    )


def _append_events(session: Session, _context: Any) -> None:
    # After the flush's statements, before its bookkeeping: ids are assigned, attribute
    # histories still show what the flush wrote. The insert goes straight to the session's
    # connection, so it shares the transaction (and a rolled-back savepoint drops it too).
    rows = [r for r in session.new if isinstance(r, Generation)]
    rows += [r for r in session.dirty if isinstance(r, Generation) and _changed(r)]
    if not rows:
        return
    now = utcnow()
    session.connection().execute(
        sa.insert(GenerationEvent),
        [
            {
                "generation_id": row.id,
                "attempt": row.attempt or 1,
                "status": row.status or "pending",
                "error_code": row.error_code,
                "at": now,
            }
            for row in rows
        ],
    )


#: A new generation's first event (``pending``), for ``generations.submission``, which writes the
#: generation with Core statements (the listener sees only ORM flushes).
FIRST_EVENT = sa.insert(GenerationEvent).values(
    generation_id=sa.bindparam("event_generation_", type_=GenerationEvent.generation_id.type),
    attempt=1,
    status=GenerationStatus.PENDING,
    error_code=None,
    at=sa.bindparam("event_at_", type_=GenerationEvent.at.type),
)


def install() -> None:
    """Append events on every ORM flush from now on (idempotent; ``generations.py`` calls it
    when imported)."""
    if not event.contains(Session, "after_flush", _append_events):
        event.listen(Session, "after_flush", _append_events)


def events_of(
    session: Session, generation_id: int, *, after: int | None = None, limit: int = 1000
) -> list[GenerationEvent]:
    """The generation's events in order, those after event id ``after`` only (resuming)."""
    query = sa.select(GenerationEvent).where(GenerationEvent.generation_id == generation_id)
    if after is not None:
        query = query.where(GenerationEvent.id > after)
    return list(session.scalars(query.order_by(GenerationEvent.id).limit(limit)))


def as_dicts(rows: Iterable[GenerationEvent]) -> list[dict[str, Any]]:
    """Events as JSON-ready dicts."""
    return [
        {
            "id": e.id,
            "generation_id": e.generation_id,
            "attempt": e.attempt,
            "status": e.status,
            "error_code": e.error_code,
            "at": e.at.isoformat(),
        }
        for e in rows
    ]
