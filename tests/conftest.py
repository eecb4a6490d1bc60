"""Shared fixtures: real databases and a local S3 endpoint for tests.

PostgreSQL comes from ``AI_HANDLER_TEST_PG_URL`` (default: the local server on 127.0.0.1:5432 with
trust auth). Each test that asks for ``pg_url`` gets a brand-new database, dropped afterwards, so
tests never see each other's rows.

S3 is one moto server over HTTP for the whole session (``local_s3``). Objects outlive the test
that wrote them, so a test gets its own empty bucket (``bucket``) or writes under a prefix of its
own; then what it lists is what it wrote.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ai_handler_dagster.devstack.s3 import LocalS3, start_local_s3
from tests.support.db import admin_engine, drop_pg_database, new_pg_database

# The ledger race tests run 32 threads at once: let this process open that many connections.
os.environ.setdefault("AI_HANDLER_DB_POOL_MAX", "40")


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        with admin_engine().connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise RuntimeError(f"PostgreSQL is required in CI: {exc}") from exc
        return False
    return True


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


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    """One in-process moto S3 server on a free port for the whole session, its bucket created."""
    with start_local_s3() as s3:
        yield s3


@pytest.fixture
def bucket(local_s3: LocalS3) -> str:
    """A fresh, empty bucket on ``local_s3`` per test, so exact key listings are meaningful."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    local_s3.client().create_bucket(Bucket=name)
    return name
