"""Announce every generation that becomes pending on PostgreSQL (``LISTEN generations_pending``).

The daemon wakes the request sensor when it hears this (``runtime/wake.py``) instead of leaving
the request to its next tick. A trigger on ``generations`` sends
``pg_notify('generations_pending', '')`` for each row inserted or updated with status
``pending``: a submit, an application's own ``INSERT``, a requeue, a backfill. The payload is
empty on purpose: PostgreSQL folds identical notifications of one transaction into one, so a
batch of submits is one wake-up, and the sensor claims what it finds, not what it was told.
SQLite has no such thing; the daemon polls it (``runtime/wake.py``).

Revision ID: 0012_pending_notify
Revises: 0011_event_notify
"""

from __future__ import annotations

from alembic import op

revision: str = "0012_pending_notify"
down_revision: str | None = "0011_event_notify"
branch_labels: str | None = None
depends_on: str | None = None

CHANNEL = "generations_pending"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION notify_generation_pending() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER generations_pending_notify AFTER INSERT OR UPDATE OF status
        ON generations FOR EACH ROW WHEN (NEW.status = 'pending')
        EXECUTE FUNCTION notify_generation_pending()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER generations_pending_notify ON generations")
    op.execute("DROP FUNCTION notify_generation_pending()")
