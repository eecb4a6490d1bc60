"""Priorities: a priority and a waiting time on each generation, a ceiling per user.

``generations.priority`` (0 to 9, default 0) orders the request sensor's claims, higher first;
``generations.pending_since`` is when the current attempt began to wait (aging counts from it;
existing rows take their ``created_at``). ``user_priorities`` holds the highest priority the
operator allows each listed user. Two indexes let a claim read a bounded number of rows however
long the queue is: (status, priority, user_id, id) for the top priority, its users and their
oldest rows, and (status, pending_since, id) for the rows that waited longest.

Revision ID: 0005_priority
Revises: 0004
"""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from alembic import op

revision: str = "0005_priority"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# As domain.MIN_PRIORITY / MAX_PRIORITY were when this migration was written.
_RANGE = "{column} >= 0 AND {column} <= 9"


def upgrade() -> None:
    bind = op.get_bind()
    # SQLite adds neither a table CHECK nor a column with a non-constant default in place: the
    # table is rebuilt (named constraints and indexes are kept). PostgreSQL alters it in place.
    recreate: Literal["always", "auto"] = "always" if bind.dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("generations", recreate=recreate) as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column(
                "pending_since",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.now(),
            )
        )
        batch.create_check_constraint(
            "ck_generations_priority_range", _RANGE.format(column="priority")
        )
    # A request waiting since before the upgrade has waited since it was made.
    op.execute("UPDATE generations SET pending_since = created_at")
    op.create_index(
        "ix_generations_status_priority_user_id_id",
        "generations",
        ["status", "priority", "user_id", "id"],
    )
    op.create_index(
        "ix_generations_status_pending_since_id", "generations", ["status", "pending_since", "id"]
    )
    op.create_table(
        "user_priorities",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("max_priority", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_priorities"),
        sa.CheckConstraint(
            _RANGE.format(column="max_priority"), name="ck_user_priorities_max_priority_range"
        ),
    )


def downgrade() -> None:
    op.drop_table("user_priorities")
    op.drop_index("ix_generations_status_pending_since_id", "generations")
    op.drop_index("ix_generations_status_priority_user_id_id", "generations")
    with op.batch_alter_table("generations") as batch:
        batch.drop_constraint("ck_generations_priority_range", type_="check")
        batch.drop_column("pending_since")
        batch.drop_column("priority")
