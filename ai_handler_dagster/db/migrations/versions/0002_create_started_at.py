"""Remember when a generation attempt first asked the provider for a prediction.

A create whose response was lost may still have started a paid prediction. When a later attempt
of the same step (op retry, resumed or retried run) finds this timestamp set, it looks for that
prediction and adopts it instead of paying for a second one.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("create_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("create_started_at")
