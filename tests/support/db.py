"""Test databases: fresh PostgreSQL databases, migrated ones per module, emptied tables, races.

PostgreSQL comes from ``AI_HANDLER_TEST_PG_URL`` (default: the local server on 127.0.0.1:5432 with
trust auth).

Creating and migrating a PostgreSQL database costs a fraction of a second; doing it for every
test would make the db, ledger and generations suites slow. Instead each test module gets one
migrated database per dialect (``migrated_database``), and every test starts from empty tables
(``emptied``), with ids starting again at 1. Tests still run against real SQLite and real
PostgreSQL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import pytest
import sqlalchemy as sa

from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import dispose_engines, make_engine
from ai_handler_dagster.db.models import Base
from ai_handler_dagster.devstack.pg import drop_database, new_database

T = TypeVar("T")

PG_ADMIN_URL = os.environ.get(
    "AI_HANDLER_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def admin_engine() -> sa.Engine:
    """An engine on the server's maintenance database (to create and drop test databases)."""
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def new_pg_database(prefix: str = "aih_test") -> str:
    """Create an empty PostgreSQL database and return its URL (drop it with drop_pg_database)."""
    return new_database(PG_ADMIN_URL, prefix)


def drop_pg_database(url: str) -> None:
    drop_database(PG_ADMIN_URL, url)


@dataclass
class PgDatabases:
    """Two fresh PostgreSQL databases: Dagster's storage and the app's."""

    dagster_url: str
    app_url: str


@contextmanager
def pg_databases(pg_available: bool) -> Iterator[PgDatabases]:
    """Create the two databases (skip without PostgreSQL), drop them afterwards."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable (set AI_HANDLER_TEST_PG_URL)")
    dagster_url = new_pg_database("aih_e2e_dagster")
    app_url = new_pg_database("aih_e2e_app")
    try:
        yield PgDatabases(dagster_url=dagster_url, app_url=app_url)
    finally:
        drop_pg_database(dagster_url)
        drop_pg_database(app_url)


@contextmanager
def migrated_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database for ``request.param`` ("sqlite" or "postgres"), dropped afterwards."""
    if request.param == "sqlite":
        folder = request.getfixturevalue("tmp_path_factory").mktemp("appdb")
        url = f"sqlite:///{folder / 'app.db'}"
        upgrade(url)
        try:
            yield url
        finally:
            dispose_engines()
        return
    if not request.getfixturevalue("pg_available"):
        pytest.skip("PostgreSQL is not reachable (set AI_HANDLER_TEST_PG_URL)")
    url = new_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        dispose_engines()
        drop_pg_database(url)


def emptied(url: str) -> sa.Engine:
    """The engine of ``url`` after deleting every row of the app tables (ids restart at 1)."""
    engine = make_engine(url)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        else:
            # SQLite reuses ids from max(id) + 1 (no AUTOINCREMENT), so empty tables restart at 1.
            for name in tables:
                conn.exec_driver_sql(f"DELETE FROM {name}")
    return engine


def race(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``fn(i)`` in ``n`` threads released at the same moment; results or exceptions."""
    barrier = threading.Barrier(n, timeout=60)
    results: list[T | BaseException] = [RuntimeError("not run")] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # collected for the assertions of the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results
