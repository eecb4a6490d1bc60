"""What the provider charged us for each attempt's prediction, in nano-USD.

Replicate reports neither the cost nor the hardware of a prediction; the cost is computed from
the operator's table of the provider's prices and what the finished prediction used, and kept
per attempt on ``create_attempts`` (kept for good, so a requeued generation's earlier attempts
keep what they cost) with the current attempt's mirrored on ``generations``. Whole nano-USD in a
BigInteger: exact, and summed alike by SQLite and PostgreSQL (SQLite has no exact decimal type).

Revision ID: 0006_provider_cost
Revises: 0005_priority
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006_provider_cost"
down_revision: str | None = "0005_priority"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("create_attempts") as batch:
        batch.add_column(sa.Column("provider_cost_nusd", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("provider_cost_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint(
            "ck_create_attempts_provider_cost",
            "provider_cost_nusd IS NULL OR provider_cost_nusd >= 0",
        )
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("provider_cost_nusd", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("provider_cost_nusd")
    with op.batch_alter_table("create_attempts") as batch:
        batch.drop_constraint("ck_create_attempts_provider_cost", type_="check")
        batch.drop_column("provider_cost_at")
        batch.drop_column("provider_cost_nusd")
