"""Fixtures of the API tests: each module's database on SQLite and PostgreSQL, emptied for each
test, and the service running on it over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.support.api import Api, running_api
from tests.support.db import emptied, migrated_database


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The module's migrated database, one per dialect."""
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    """The module's database, emptied for this test."""
    return emptied(db_url)


@pytest.fixture
def api(engine: sa.Engine) -> Iterator[Api]:
    """The service on ``engine``, served by uvicorn on a free port."""
    with running_api(engine) as running:
        yield running
