"""The create throttle: one token bucket for the creates of every run, process and host.

Each run's create step used to fire creates and retry 429s on its own, so at a low provider
limit a storm of 429s followed and generations failed once their retries ran out. Creates now
take a turn from one row (``throttle.py``), locked for each turn, fed by the provider's
``ratelimit-remaining`` and 429 ``Retry-After``.

Revision ID: 0007_throttle
Revises: 0006_provider_cost
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007_throttle"
down_revision: str | None = "0006_provider_cost"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "create_throttle",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("per_minute", sa.Float(), nullable=False),
        sa.Column("burst", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_create_throttle"),
        sa.CheckConstraint("per_minute > 0", name="ck_create_throttle_per_minute_positive"),
        sa.CheckConstraint("burst >= 1", name="ck_create_throttle_burst_positive"),
    )


def downgrade() -> None:
    op.drop_table("create_throttle")
