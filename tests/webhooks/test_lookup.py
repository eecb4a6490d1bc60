"""Lookups read what the webhook route recorded, cheaply, and never fail the wait.

Proves, on SQLite and PostgreSQL: ``make_lookup`` answers ``None`` for an unknown prediction and
the recorded prediction (status, output, metrics, raw payload) for a known one; ``lookup_many``
reads 200 ids in one query; ``make_batched_lookup`` answers many lookups from one query per
``max_age_s``, sees a new webhook after that, keeps terminal states without reading them again,
and reads an id it does not watch on its own; a database error answers ``None`` instead of
raising.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from ai_handler_dagster.webhooks import record_delivery
from ai_handler_dagster.webhooks.lookup import lookup_many, make_batched_lookup, make_lookup
from tests.support.webhooks import prediction


@contextmanager
def _counting(engine: sa.Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def test_lookup_returns_the_recorded_prediction(engine: sa.Engine) -> None:
    lookup = make_lookup(engine)
    assert lookup("p1") is None
    doc = prediction("p1", "succeeded")
    record_delivery(engine, "m1", doc)
    snapshot = lookup("p1")
    assert snapshot is not None
    assert (snapshot.id, snapshot.status, snapshot.is_terminal) == ("p1", "succeeded", True)
    assert snapshot.output == doc["output"]
    assert snapshot.predict_time == 1.5
    assert dict(snapshot.raw) == doc
    record_delivery(engine, "m2", prediction("p2", "processing"))
    running = lookup("p2")
    assert running is not None and not running.is_terminal


def test_lookup_many_is_one_query(engine: sa.Engine) -> None:
    ids = [f"p{i}" for i in range(200)]
    for pid in ids[::2]:
        record_delivery(engine, f"m_{pid}", prediction(pid, "failed", error="boom"))
    with _counting(engine) as statements:
        found = lookup_many(engine, ids)
    assert len(statements) == 1
    assert sorted(found) == sorted(ids[::2])
    assert {s.status for s in found.values()} == {"failed"}
    assert found["p0"].error == "boom"


def test_batched_lookup_reads_once_per_max_age(engine: sa.Engine) -> None:
    ids = [f"p{i}" for i in range(50)]
    for pid in ids:
        record_delivery(engine, f"start_{pid}", prediction(pid, "processing"))
    lookup = make_batched_lookup(engine, ids, max_age_s=0.3)
    with _counting(engine) as statements:
        assert all(lookup(pid).status == "processing" for pid in ids)  # type: ignore[union-attr]
        assert len(statements) == 1
        record_delivery(engine, "done_p7", prediction("p7", "succeeded"))
        # Within max_age the cached answer stands; after it, one query brings the news.
        assert lookup("p7").status == "processing"  # type: ignore[union-attr]
        time.sleep(0.35)
        assert lookup("p7").status == "succeeded"  # type: ignore[union-attr]
        assert len(statements) == 2
        # A terminal state is never read again; refreshes cover only the running ones.
        time.sleep(0.35)
        assert lookup("p7").status == "succeeded"  # type: ignore[union-attr]
        assert len(statements) == 2
        lookup("p8")
        assert len(statements) == 3
        # An id outside the batch is read on its own.
        assert lookup("elsewhere") is None
        assert len(statements) == 4


def test_database_errors_answer_none(tmp_path: Path) -> None:
    # Never migrated: every read fails, as during an outage.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert make_lookup(engine)("p1") is None
        batched = make_batched_lookup(engine, ["p1", "p2"], max_age_s=60)
        assert batched("p1") is None
        assert batched("p2") is None
    finally:
        engine.dispose()
