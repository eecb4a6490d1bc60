"""Webhook deliveries (for deduplication) and prediction states reported by webhooks.

With hundreds of predictions in flight, polling each one exceeds Replicate's request budget. A
receiver records what signed webhooks report in ``prediction_states``; the await step reads it
and polls only slowly, as a fallback. ``webhook_deliveries`` remembers every accepted
``webhook-id`` so a retried or replayed delivery is ignored.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("webhook_id", sa.String(255), nullable=False),
        sa.Column("prediction_id", sa.String(255), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("webhook_id", name="pk_webhook_deliveries"),
    )
    op.create_index("ix_webhook_deliveries_prediction_id", "webhook_deliveries", ["prediction_id"])
    op.create_index("ix_webhook_deliveries_received_at", "webhook_deliveries", ["received_at"])

    op.create_table(
        "prediction_states",
        sa.Column("prediction_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("prediction_id", name="pk_prediction_states"),
    )
    op.create_index("ix_prediction_states_updated_at", "prediction_states", ["updated_at"])


def downgrade() -> None:
    op.drop_table("prediction_states")
    op.drop_table("webhook_deliveries")
