"""The HTTP API's list of a user's generations: ``(user_id, id)`` instead of ``(user_id)``.

``GET /v1/generations?user=`` pages newest first (``WHERE user_id = ? AND id < ? ORDER BY id
DESC LIMIT n``). With an index on ``user_id`` alone PostgreSQL has to read and sort every row of
the user to find a page (its index entries of one user are in heap order, not id order); with
``(user_id, id)`` a page is one index range read, whatever the user's history. The new index
serves every lookup the old one did (it is its prefix), so the old one goes.

Revision ID: 0009_gen_api
Revises: 0008_api
"""

from __future__ import annotations

from alembic import op

revision: str = "0009_gen_api"
down_revision: str | None = "0008_api"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_generations_user_id_id", "generations", ["user_id", "id"])
    op.drop_index("ix_generations_user_id", table_name="generations")


def downgrade() -> None:
    op.create_index("ix_generations_user_id", "generations", ["user_id"])
    op.drop_index("ix_generations_user_id_id", table_name="generations")
