"""Announce every generation event on PostgreSQL (``LISTEN generation_events``).

The HTTP API's event streams (``GET /v1/generations/{id}/events``) wait on a notification
instead of polling the table: a trigger on ``generation_events`` sends
``pg_notify('generation_events', '<generation id>')`` for each new row. PostgreSQL delivers a
notification only when its transaction commits, and folds identical payloads of one
transaction into one, so a listener hears of exactly the committed events, once per generation
and transaction, whatever process wrote them (a run, a sensor, the API, an operator's SQL).
SQLite has no such thing; its streams poll (``api/streams.py``).

Revision ID: 0011_event_notify
Revises: 0010_accounts_api
"""

from __future__ import annotations

from alembic import op

revision: str = "0011_event_notify"
down_revision: str | None = "0010_accounts_api"
branch_labels: str | None = None
depends_on: str | None = None

CHANNEL = "generation_events"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION notify_generation_event() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.generation_id::text);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER generation_events_notify AFTER INSERT ON generation_events
        FOR EACH ROW EXECUTE FUNCTION notify_generation_event()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER generation_events_notify ON generation_events")
    op.execute("DROP FUNCTION notify_generation_event()")
