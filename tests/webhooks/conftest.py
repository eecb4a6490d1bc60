"""Fixtures for the webhook tests: a migrated app database per dialect (emptied per test), the
service with the signing secret set, and the delivery counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from ai_handler_dagster.webhooks.config import SECRET_VAR
from tests.support.api import Api, running_api
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
def api(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """``ai-handler serve``'s app over real HTTP, verifying with ``SECRET``."""
    monkeypatch.setenv(SECRET_VAR, SECRET)
    with running_api(engine) as running:
        yield running


class Deliveries:
    """``ai_handler_webhook_deliveries_total`` by outcome, counted from the fixture's start
    (the counter belongs to the process, shared by every test)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> dict[str, float]:
        counts: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if metric.name == "ai_handler_webhook_deliveries":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        counts[sample.labels["outcome"]] = sample.value
        return counts

    def since_start(self) -> dict[str, int]:
        """Outcome -> deliveries counted since the fixture started (zeros left out)."""
        now = self._now()
        changed = {k: int(v - self._start.get(k, 0)) for k, v in now.items()}
        return {k: v for k, v in changed.items() if v}


@pytest.fixture
def deliveries() -> Deliveries:
    return Deliveries()
