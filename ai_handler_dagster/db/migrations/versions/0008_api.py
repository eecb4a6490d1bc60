"""The HTTP API: the generation event log, API keys and per-key request counts.

``generation_events`` gets one row per state change of a generation, in the transaction that
made it (the API's status pages and streams read it). ``api_keys`` holds the keys applications
call the API with, as SHA-256 hashes of their secrets, with scopes; ``api_request_counts`` counts
each key's requests per minute, so the rate limit holds across every worker and host.

Revision ID: 0008_api
Revises: 0007_throttle
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008_api"
down_revision: str | None = "0007_throttle"
branch_labels: str | None = None
depends_on: str | None = None

# As domain.GenerationStatus and the priority range were when this migration was written.
_STATUSES = "status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'canceled')"
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "generation_events",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("generation_id", _Id, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_generation_events"),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name="fk_generation_events_generation_id_generations",
        ),
        sa.CheckConstraint(_STATUSES, name="ck_generation_events_status_valid"),
    )
    op.create_index(
        "ix_generation_events_generation_id_id", "generation_events", ["generation_id", "id"]
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("scopes", sa.String(255), nullable=False),
        sa.Column("max_priority", sa.Integer(), nullable=True),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
        sa.CheckConstraint(
            "max_priority IS NULL OR (max_priority >= 0 AND max_priority <= 9)",
            name="ck_api_keys_max_priority_range",
        ),
        sa.CheckConstraint(
            "rate_per_minute IS NULL OR rate_per_minute >= 1",
            name="ck_api_keys_rate_per_minute_positive",
        ),
    )
    op.create_table(
        "api_request_counts",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "minute", name="pk_api_request_counts"),
    )


def downgrade() -> None:
    op.drop_table("api_request_counts")
    op.drop_table("api_keys")
    op.drop_index("ix_generation_events_generation_id_id", table_name="generation_events")
    op.drop_table("generation_events")
