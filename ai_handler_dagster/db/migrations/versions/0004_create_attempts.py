"""Every create attempt and the prediction it owns, kept across requeues.

Replicate's create has no idempotency key: a create whose answer was lost is found again by
listing recent predictions. To adopt only a prediction that this attempt could have made and
nobody else owns, every attempt's first create time, requested model, input hash, state and
owned prediction are kept here for good (a requeue starts a new row instead of forgetting the
old prediction), and a prediction id can be owned by one attempt only, ever. The attempt's
create time moves here from ``generations.create_started_at``. Also an index on
``generations.created_at``, which reprocessing backfills select by day.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "create_attempts",
        sa.Column(
            "generation_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("prediction_id", sa.String(255), nullable=True),
        sa.Column("how", sa.String(16), nullable=True),
        sa.Column("answered_model", sa.String(255), nullable=True),
        sa.Column("answered_version", sa.String(255), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("generation_id", "attempt", name="pk_create_attempts"),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name="fk_create_attempts_generation_id_generations",
        ),
        sa.UniqueConstraint("prediction_id", name="uq_create_attempts_prediction_id"),
        sa.CheckConstraint(
            "state IN ('creating', 'lost', 'owned', 'abandoned')", name="ck_create_attempts_state"
        ),
        sa.CheckConstraint(
            "(state = 'owned') = (prediction_id IS NOT NULL)",
            name="ck_create_attempts_owned_has_prediction",
        ),
        sa.CheckConstraint(
            "how IS NULL OR how IN ('created', 'adopted')", name="ck_create_attempts_how"
        ),
    )
    op.create_index(
        "ix_create_attempts_model_input_sha256", "create_attempts", ["model", "input_sha256"]
    )
    op.create_index("ix_create_attempts_started_at", "create_attempts", ["started_at"])
    _carry_over_started_creates()
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("create_started_at")
    # A reprocessing backfill selects one day of requests; without it, a scan of the table.
    op.create_index("ix_generations_created_at", "generations", ["created_at"])


def _input_sha256(value: Any) -> str:
    # As generations.input_sha256 computed it when this migration was written.
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = str(value)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _carry_over_started_creates() -> None:
    """Attempts that already asked the provider keep what they knew: when, and what they own."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT id, attempt, model, input, create_started_at, prediction_id, "
            "prediction_model, prediction_version FROM generations "
            "WHERE create_started_at IS NOT NULL"
        )
    ).all()
    sqlite = bind.dialect.name == "sqlite"
    for row in rows:
        payload = row.input
        if isinstance(payload, str):  # SQLite hands back the stored text
            # A row that is not JSON is hashed as its text: it matches no prediction.
            with contextlib.suppress(ValueError, RecursionError):
                payload = json.loads(payload)
        started = row.create_started_at
        if isinstance(started, str):
            started = datetime.fromisoformat(started)
        started = started.replace(tzinfo=UTC) if started.tzinfo is None else started
        # Stored as the models store it: naive UTC text on SQLite, timestamptz on PostgreSQL.
        started = started.astimezone(UTC).replace(tzinfo=None) if sqlite else started
        bind.execute(
            sa.text(
                "INSERT INTO create_attempts (generation_id, attempt, model, input_sha256, "
                "started_at, state, state_at, lost_at, prediction_id, how, answered_model, "
                "answered_version) VALUES (:gid, :attempt, :model, :sha, :started, :state, "
                ":started, :lost_at, :pid, :how, :answered_model, :answered_version)"
            ),
            {
                "gid": row.id,
                "attempt": row.attempt,
                "model": row.model,
                "sha": _input_sha256(payload),
                "started": started,
                "state": "owned" if row.prediction_id else "lost",
                # Unknown before this table: counted as lost, so orphan sweeps consider it.
                "lost_at": started,
                "pid": row.prediction_id,
                "how": "created" if row.prediction_id else None,
                "answered_model": row.prediction_model,
                "answered_version": row.prediction_version,
            },
        )


def downgrade() -> None:
    op.drop_index("ix_generations_created_at", "generations")
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("create_started_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_table("create_attempts")
