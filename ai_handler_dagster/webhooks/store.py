"""Recording webhook deliveries and prediction states: one short transaction per delivery.

Two rules hold on SQLite and PostgreSQL alike, enforced by the statements themselves rather than
by a read-then-write in Python (which two concurrent deliveries could interleave):

- **Deduplication.** ``INSERT ... ON CONFLICT DO NOTHING`` on ``webhook_deliveries``: the first
  delivery of a ``webhook-id`` inserts a row, any later one inserts nothing and changes nothing.
- **Monotonic state.** ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` on ``prediction_states``:
  the update applies only when the stored status is not terminal and the new status ranks at
  least as high (``starting`` < ``processing`` < terminal). Events may arrive out of order (a
  retried ``start`` after ``completed``), and a prediction ends only once, so the first terminal
  state recorded is final.

Both statements run in one transaction: a delivery is either fully recorded or not at all, so a
failed write (database down) leaves nothing that would make Replicate's retry look like a
duplicate.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ai_handler_dagster.db.models import PredictionState, WebhookDelivery, utcnow
from ai_handler_dagster.domain import PREDICTION_TERMINAL, PredictionStatus

#: What happened to a delivery: recorded and applied, recorded but older than the stored state
#: (out of order), or already seen (same ``webhook-id``).
Outcome = Literal["accepted", "out_of_order", "duplicate"]

_statements: dict[str, tuple[sa.Executable, sa.Executable]] = {}
_statements_lock = threading.Lock()
# SQLite has one write lock per database. Writers of this process queue on a Python lock instead
# of on SQLite's busy handler, which sleeps in growing steps and wastes most of the time a busy
# webhook route has; writers of other processes still wait on busy_timeout.
_sqlite_write_locks: dict[int, threading.Lock] = {}


def status_rank(status: str) -> int:
    """Order of a prediction status in its lifecycle: 0 starting (or unknown), 1 processing,
    2 terminal."""
    if status in PREDICTION_TERMINAL:
        return 2
    return 1 if status == PredictionStatus.PROCESSING else 0


def _rank_sql(column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    # The SQL twin of status_rank.
    whens: dict[str, int] = {
        PredictionStatus.PROCESSING: 1,
        **dict.fromkeys(PREDICTION_TERMINAL, 2),
    }
    return sa.case(whens, value=column, else_=0)


def _build(dialect: str) -> tuple[sa.Executable, sa.Executable]:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    delivery = insert(WebhookDelivery).on_conflict_do_nothing(
        index_elements=[WebhookDelivery.webhook_id]
    )
    state = insert(PredictionState)
    table = PredictionState.__table__.c
    state = state.on_conflict_do_update(
        index_elements=[PredictionState.prediction_id],
        set_={
            "status": state.excluded.status,
            "payload": state.excluded.payload,
            "updated_at": state.excluded.updated_at,
        },
        where=sa.and_(
            table.status.not_in(PREDICTION_TERMINAL),
            _rank_sql(state.excluded.status) >= _rank_sql(table.status),
        ),
    )
    return delivery, state


def _statements_for(engine: sa.Engine) -> tuple[sa.Executable, sa.Executable]:
    name = engine.dialect.name
    if name not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"webhook storage supports PostgreSQL and SQLite, not {name}")
    with _statements_lock:
        built = _statements.get(name)
        if built is None:
            built = _statements[name] = _build(name)
        if name == "sqlite":
            _sqlite_write_locks.setdefault(id(engine), threading.Lock())
        return built


def record_delivery(
    engine: sa.Engine,
    webhook_id: str,
    prediction: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> Outcome:
    """Record one verified delivery of ``prediction`` (a dict with ``id`` and ``status``).

    Returns ``duplicate`` (nothing changed) when ``webhook_id`` was recorded before,
    ``out_of_order`` when the delivery is new but the stored state is already further along
    (the delivery is remembered, the state is kept), else ``accepted``.
    """
    delivery_sql, state_sql = _statements_for(engine)
    when = now or utcnow()
    prediction_id = str(prediction["id"])
    lock = _sqlite_write_locks.get(id(engine)) if engine.dialect.name == "sqlite" else None
    if lock is not None:
        lock.acquire()
    try:
        with engine.begin() as conn:
            inserted = conn.execute(
                delivery_sql,
                {"webhook_id": webhook_id, "prediction_id": prediction_id, "received_at": when},
            ).rowcount
            if inserted == 0:
                return "duplicate"
            changed = conn.execute(
                state_sql,
                {
                    "prediction_id": prediction_id,
                    "status": str(prediction["status"]),
                    "payload": dict(prediction),
                    "updated_at": when,
                },
            ).rowcount
    finally:
        if lock is not None:
            lock.release()
    return "accepted" if changed else "out_of_order"


#: How long deliveries and states are kept: far beyond the signature tolerance (a replay older
#: than it is refused anyway) and the longest prediction deadline (6 h). Reconciliation prunes.
RETENTION = timedelta(hours=72)


def prune(engine: sa.Engine, older_than: timedelta = RETENTION) -> tuple[int, int]:
    """Delete deliveries received and states last updated more than ``older_than`` ago.

    Returns ``(deliveries, states)`` deleted. Keep ``older_than`` well above the signature
    tolerance and the longest wait: a replay older than the tolerance is refused anyway, and a
    pruned state only means the await step polls that prediction instead.
    """
    cutoff = utcnow() - older_than
    with engine.begin() as conn:
        deliveries = conn.execute(
            sa.delete(WebhookDelivery).where(WebhookDelivery.received_at < cutoff)
        ).rowcount
        states = conn.execute(
            sa.delete(PredictionState).where(PredictionState.updated_at < cutoff)
        ).rowcount
    return deliveries, states
