"""Shared fixtures: real databases for tests.

PostgreSQL comes from ``AI_HANDLER_TEST_PG_URL`` (default: the local server on 127.0.0.1:5432 with
trust auth). Each test that asks for ``pg_url`` gets a brand-new database, dropped afterwards, so
tests never see each other's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ai_handler_dagster.devstack.pg import drop_database, new_database

# The ledger race tests run 32 threads at once: let this process open that many connections.
os.environ.setdefault("AI_HANDLER_DB_POOL_MAX", "40")

PG_ADMIN_URL = os.environ.get(
    "AI_HANDLER_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def _admin_engine() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        with _admin_engine().connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise RuntimeError(f"PostgreSQL is required in CI: {exc}") from exc
        return False
    return True


def new_pg_database(prefix: str = "aih_test") -> str:
    """Create an empty PostgreSQL database and return its URL (drop it with drop_pg_database)."""
    return new_database(PG_ADMIN_URL, prefix)


def drop_pg_database(url: str) -> None:
    drop_database(PG_ADMIN_URL, url)


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable (set AI_HANDLER_TEST_PG_URL)")
    url = new_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite database file."""
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")
