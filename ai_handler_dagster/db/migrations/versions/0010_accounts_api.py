"""Indexes for the API's statements and metrics.

``GET /v1/users/{user}/ledger`` pages an account's entries newest first; on PostgreSQL an index
on ``account_id`` alone does not keep them in id order, so a page of a long statement would sort
every entry of the account. ``(account_id, id)`` reads a page straight from the index and serves
everything the old one did, which it replaces. ``GET /metrics`` counts generations by status and
error code (an index-only scan of ``(status, error_code)``) and reads the ones that ended in the
last minutes (``finished_at``).

Revision ID: 0010_accounts_api
Revises: 0009_gen_api
"""

from __future__ import annotations

from alembic import op

revision: str = "0010_accounts_api"
down_revision: str | None = "0009_gen_api"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_ledger_entries_account_id_id", "ledger_entries", ["account_id", "id"])
    op.drop_index("ix_ledger_entries_account_id", table_name="ledger_entries")
    op.create_index("ix_generations_status_error_code", "generations", ["status", "error_code"])
    op.create_index("ix_generations_finished_at", "generations", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_generations_finished_at", table_name="generations")
    op.drop_index("ix_generations_status_error_code", table_name="generations")
    op.create_index("ix_ledger_entries_account_id", "ledger_entries", ["account_id"])
    op.drop_index("ix_ledger_entries_account_id_id", table_name="ledger_entries")
