"""Initial schema: accounts, holds, ledger entries, generations.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Written by hand to match ``db/models.py``; ``tests/db/test_migrations.py`` proves they agree on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = True, now: bool = False) -> sa.Column[object]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.func.now() if now else None,
    )


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"),
        _ts("created_at", nullable=False, now=True),
        _ts("updated_at", nullable=False, now=True),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("user_id", name="uq_accounts_user_id"),
        sa.CheckConstraint("held >= 0", name="ck_accounts_held_nonnegative"),
        sa.CheckConstraint("balance - held >= 0", name="ck_accounts_available_nonnegative"),
    )

    op.create_table(
        "holds",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("generation_id", sa.BigInteger(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("captured_amount", sa.BigInteger(), nullable=False, server_default="0"),
        _ts("expires_at", nullable=False),
        _ts("created_at", nullable=False, now=True),
        _ts("ended_at"),
        sa.PrimaryKeyConstraint("id", name="pk_holds"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_holds_account_id_accounts"
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_holds_idempotency_key"),
        sa.CheckConstraint("amount > 0", name="ck_holds_amount_positive"),
        sa.CheckConstraint(
            "status IN ('pending', 'captured', 'released', 'expired')",
            name="ck_holds_status_valid",
        ),
        sa.CheckConstraint(
            "captured_amount >= 0 AND captured_amount <= amount",
            name="ck_holds_captured_within_amount",
        ),
        sa.CheckConstraint(
            "status = 'captured' OR captured_amount = 0",
            name="ck_holds_captured_only_when_captured",
        ),
        sa.CheckConstraint(
            "(status = 'pending' AND ended_at IS NULL)"
            " OR (status <> 'pending' AND ended_at IS NOT NULL)",
            name="ck_holds_ended_at_matches_status",
        ),
    )
    op.create_index("ix_holds_account_id", "holds", ["account_id"])
    op.create_index("ix_holds_generation_id", "holds", ["generation_id"])

    op.create_table(
        "ledger_entries",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("hold_id", ID, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_delta", sa.BigInteger(), nullable=False),
        sa.Column("held_delta", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(300), nullable=False),
        sa.Column("memo", sa.String(500), nullable=True),
        _ts("created_at", nullable=False, now=True),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_entries"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_ledger_entries_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"], name="fk_ledger_entries_hold_id_holds"),
        sa.UniqueConstraint("idempotency_key", name="uq_ledger_entries_idempotency_key"),
        sa.CheckConstraint(
            "kind IN ('grant', 'hold', 'capture', 'release', 'expire')",
            name="ck_ledger_entries_kind_valid",
        ),
        sa.CheckConstraint("amount >= 0", name="ck_ledger_entries_amount_nonnegative"),
        sa.CheckConstraint(
            "kind = 'grant' OR hold_id IS NOT NULL", name="ck_ledger_entries_hold_entries_have_hold"
        ),
    )
    op.create_index("ix_ledger_entries_account_id", "ledger_entries", ["account_id"])
    op.create_index("ix_ledger_entries_hold_id", "ledger_entries", ["hold_id"])
    # At most one ending (capture/release/expire) and one opening entry per hold, enforced by
    # the database on both dialects.
    ending = sa.text("kind IN ('capture', 'release', 'expire')")
    op.create_index(
        "uq_ledger_entries_hold_ending",
        "ledger_entries",
        ["hold_id"],
        unique=True,
        sqlite_where=ending,
        postgresql_where=ending,
    )
    opening = sa.text("kind = 'hold'")
    op.create_index(
        "uq_ledger_entries_hold_opening",
        "ledger_entries",
        ["hold_id"],
        unique=True,
        sqlite_where=opening,
        postgresql_where=opening,
    )

    op.create_table(
        "generations",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("batch_key", sa.String(255), nullable=True),
        sa.Column("dagster_run_id", sa.String(64), nullable=True),
        sa.Column("prediction_id", sa.String(255), nullable=True),
        sa.Column("prediction_model", sa.String(255), nullable=True),
        sa.Column("prediction_version", sa.String(255), nullable=True),
        sa.Column("hold_id", ID, nullable=True),
        sa.Column("amount_held", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("amount_charged", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        _ts("created_at", nullable=False, now=True),
        _ts("queued_at"),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("updated_at", nullable=False, now=True),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"], name="fk_generations_hold_id_holds"),
        sa.UniqueConstraint("request_id", name="uq_generations_request_id"),
        sa.UniqueConstraint("prediction_id", name="uq_generations_prediction_id"),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'canceled')",
            name="ck_generations_status_valid",
        ),
        sa.CheckConstraint("attempt >= 1", name="ck_generations_attempt_positive"),
        sa.CheckConstraint("amount_held >= 0", name="ck_generations_amount_held_nonnegative"),
        sa.CheckConstraint("amount_charged >= 0", name="ck_generations_amount_charged_nonnegative"),
    )
    op.create_index("ix_generations_user_id", "generations", ["user_id"])
    op.create_index("ix_generations_batch_key", "generations", ["batch_key"])
    op.create_index("ix_generations_dagster_run_id", "generations", ["dagster_run_id"])
    op.create_index("ix_generations_status_id", "generations", ["status", "id"])


def downgrade() -> None:
    op.drop_table("generations")
    op.drop_table("ledger_entries")
    op.drop_table("holds")
    op.drop_table("accounts")
