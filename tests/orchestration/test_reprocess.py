"""Reprocessing jobs in process: a day's partition re-queues exactly that day's failed requests,
and the Launchpad job re-queues the ids it is given.

Regression: on SQLite, rows an application inserted with ``CURRENT_TIMESTAMP`` (no fractional
seconds) at exactly midnight fell into the previous day's partition, because SQLite compares the
stored text and ``"<day> 00:00:00"`` sorts below ``"<day> 00:00:00.000000"``.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.orchestration.reprocess import reprocess_day_job, reprocess_generations_job
from ai_handler_dagster.resources.database import DatabaseResource


def insert_failed(url: str, created_at: str, status: str = "failed") -> int:
    """A row as an application writes it, with a text timestamp (no fraction on SQLite)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            created = sa.text(f"TIMESTAMPTZ '{created_at}+00'")
        else:
            created = sa.text(f"'{created_at}'")
        return int(
            conn.execute(
                sa.insert(Generation)
                .values(
                    user_id="ada",
                    model="demo/pixel-sketch",
                    input={"prompt": "again"},
                    status=status,
                    error_code="prediction_failed" if status == "failed" else None,
                    created_at=created,
                )
                .returning(Generation.id)
            ).scalar_one()
        )


def status_and_attempt(url: str) -> dict[int, tuple[str, int]]:
    with session_scope(make_engine(url)) as session:
        return {g.id: (g.status, g.attempt) for g in session.scalars(sa.select(Generation))}


def test_a_day_partition_requeues_that_days_failures_only(
    app_db: str, instance: DagsterInstance
) -> None:
    before = insert_failed(app_db, "2026-11-27 23:59:59")
    midnight = insert_failed(app_db, "2026-11-28 00:00:00")
    late = insert_failed(app_db, "2026-11-28 23:59:59")
    succeeded = insert_failed(app_db, "2026-11-28 12:00:00", status="succeeded")
    after = insert_failed(app_db, "2026-11-29 00:00:00")
    result = reprocess_day_job.execute_in_process(
        partition_key="2026-11-28",
        resources={"database": DatabaseResource(url=app_db)},
        instance=instance,
    )
    assert result.success
    assert sorted(result.output_for_node("requeue_day")) == [midnight, late]
    rows = status_and_attempt(app_db)
    assert rows[midnight] == ("pending", 2)
    assert rows[late] == ("pending", 2)
    assert rows[before] == ("failed", 1)
    assert rows[after] == ("failed", 1)
    assert rows[succeeded] == ("succeeded", 1)


def test_include_succeeded_regenerates_succeeded_requests_too(
    app_db: str, instance: DagsterInstance
) -> None:
    done = insert_failed(app_db, "2026-11-28 12:00:00", status="succeeded")
    result = reprocess_day_job.execute_in_process(
        partition_key="2026-11-28",
        run_config={"ops": {"requeue_day": {"config": {"include_succeeded": True}}}},
        resources={"database": DatabaseResource(url=app_db)},
        instance=instance,
    )
    assert result.success
    assert status_and_attempt(app_db)[done] == ("pending", 2)


@pytest.mark.parametrize("include_succeeded", [False, True])
def test_the_launchpad_job_requeues_given_ids(
    app_db: str, instance: DagsterInstance, include_succeeded: bool
) -> None:
    failed = insert_failed(app_db, "2026-11-28 10:00:00")
    done = insert_failed(app_db, "2026-11-28 11:00:00", status="succeeded")
    result = reprocess_generations_job.execute_in_process(
        run_config={
            "ops": {
                "requeue_ids": {
                    "config": {
                        "generation_ids": [failed, done, 999_999],
                        "include_succeeded": include_succeeded,
                    }
                }
            }
        },
        resources={"database": DatabaseResource(url=app_db)},
        instance=instance,
    )
    assert result.success
    expected = [failed, done] if include_succeeded else [failed]
    assert sorted(result.output_for_node("requeue_ids")) == expected
    assert status_and_attempt(app_db)[done] == (
        ("pending", 2) if include_succeeded else ("succeeded", 1)
    )


def test_a_day_of_requests_is_read_through_the_created_at_index(pg_url: str) -> None:
    """Regression: the day's range filtered on an unindexed ``created_at``, a scan of every
    generation ever requested for each partition of a backfill."""
    from datetime import UTC, datetime

    from ai_handler_dagster.db import upgrade
    from ai_handler_dagster.orchestration.reprocess import day_of_requests

    upgrade(pg_url)
    for hour in range(3):
        insert_failed(pg_url, f"2026-03-0{hour + 1} 10:00:00")
    query = day_of_requests(datetime(2026, 3, 2, tzinfo=UTC), ["failed", "canceled"])
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        # A three-row table is scanned anyway; forbid that to see which index the plan can use.
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
        plan = "\n".join(row[0] for row in conn.execute(sa.text(f"EXPLAIN {compiled}")))
    assert "ix_generations_created_at" in plan, plan
