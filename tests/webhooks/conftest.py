"""Fixtures for the webhook tests: a migrated app database per dialect (emptied per test) and
live receivers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster.webhooks import ReceiverHandle, start_receiver
from tests.support.db import emptied, migrated_database
from tests.support.webhooks import SECRET


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """One migrated database per dialect for the module (see tests/support/db.py)."""
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    """The module's database with empty tables."""
    return emptied(db_url)


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., ReceiverHandle]]:
    """Start receivers (stopped at teardown)."""
    handles: list[ReceiverHandle] = []

    def make(engine: sa.Engine, secret: str = SECRET, **kwargs: Any) -> ReceiverHandle:
        handle = start_receiver(engine, secret, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()
