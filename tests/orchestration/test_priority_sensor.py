"""The request sensor under a long queue: priorities, aging and ``dagster/priority``.

Drives the real ``generation_request_sensor`` with ``build_sensor_context`` on SQLite and
PostgreSQL. Proves: with 1,000 low-priority requests pending and room in flight, a
high-priority request submitted after them (through ``submit``, by a user whose ceiling allows
it) is claimed within two ticks, in a run of its own priority tagged ``dagster/priority``;
with the same backlog and higher priorities ahead, a low-priority request pending past
``AI_HANDLER_PRIORITY_AGING_S`` is claimed on the next tick (its run at the top
``dagster/priority``) while an equally low, fresh one still waits; every run holds one priority
and its tags say which.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, RunRequest, SensorResult, build_sensor_context

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger, priorities
from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import dispose_engines, make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.domain import MAX_PRIORITY, RunTag
from ai_handler_dagster.orchestration.request_sensor import generation_request_sensor
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource


@pytest.fixture
def db_url(any_db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    upgrade(any_db_url)
    # Room in flight for the whole backlog; batches of 50, so a tick claims 400 (8 runs).
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT", "5000")
    monkeypatch.setenv("AI_HANDLER_MAX_BATCH", "50")
    monkeypatch.setenv("AI_HANDLER_PRIORITY_AGING_S", "60")
    monkeypatch.delenv("AI_HANDLER_DEFAULT_PRIORITY", raising=False)
    yield any_db_url
    dispose_engines()


@pytest.fixture
def instance() -> DagsterInstance:
    return DagsterInstance.ephemeral()


def backlog(
    url: str, count: int, *, priority: int = 0, users: int = 20, waited: timedelta | None = None
) -> list[int]:
    """Rows as an application inserts them, spread over ``users`` users."""
    since = datetime.now(UTC) - (waited or timedelta(0))
    rows = [
        {
            "user_id": f"free-{i % users:02d}",
            "model": "demo/pixel-sketch",
            "input": {"prompt": f"picture {i}"},
            "priority": priority,
            "pending_since": since,
        }
        for i in range(count)
    ]
    with session_scope(make_engine(url)) as session:
        return list(session.scalars(sa.insert(Generation).returning(Generation.id), rows))


def tick(url: str, instance: DagsterInstance) -> list[RunRequest]:
    context = build_sensor_context(
        instance=instance, resources={"database": DatabaseResource(url=url)}
    )
    result = generation_request_sensor(context)
    assert isinstance(result, SensorResult)
    return list(result.run_requests or [])


def config_ids(request: RunRequest) -> list[int]:
    return request.run_config["ops"]["reserve_credits"]["config"]["generation_ids"]


def priorities_of(url: str, ids: list[int]) -> set[int]:
    with session_scope(make_engine(url)) as session:
        return set(
            session.scalars(sa.select(Generation.priority).where(Generation.id.in_(ids))).all()
        )


def status(url: str, gid: int) -> str:
    with session_scope(make_engine(url)) as session:
        return gens.get(session, gid).status


def submit_paid(url: str) -> int:
    """A request of a user the operator gave priority 7, through ``submit``."""
    with session_scope(make_engine(url)) as session:
        ledger.grant(session, "paid", 100, "fund-paid")
        priorities.set_ceiling(session, "paid", 7)
    with session_scope(make_engine(url)) as session:
        return gens.submit(
            session,
            user_id="paid",
            model="demo/pixel-sketch",
            input={"prompt": "now"},
            prices=load_pricing(),
        ).id


def assert_one_priority_per_run(url: str, requests: list[RunRequest]) -> None:
    for request in requests:
        found = priorities_of(url, config_ids(request))
        assert len(found) == 1, (request.run_key, found)
        assert request.tags[RunTag.PRIORITY] == str(next(iter(found)))


def test_a_high_priority_request_behind_1000_low_ones_is_claimed_within_two_ticks(
    db_url: str, instance: DagsterInstance
) -> None:
    """Regression guard: claiming oldest-first put a paid request behind the whole free
    backlog (1,000 here: three ticks of 400)."""
    low = backlog(db_url, 1000)
    first = tick(db_url, instance)
    assert sum(len(config_ids(r)) for r in first) == 400
    paid = submit_paid(db_url)  # after the 1,000 and after a tick
    assert paid > max(low)
    second = tick(db_url, instance)
    assert config_ids(second[0]) == [paid]  # the first run of the next tick
    assert second[0].tags[RunTag.DAGSTER_PRIORITY] == "7"
    assert second[0].tags[RunTag.PRIORITY] == "7"
    assert status(db_url, paid) == "queued"
    assert {r.tags[RunTag.DAGSTER_PRIORITY] for r in [*first, *second[1:]]} == {"0"}
    assert_one_priority_per_run(db_url, [*first, *second])


def test_a_low_priority_request_past_the_aging_limit_is_claimed_too(
    db_url: str, instance: DagsterInstance
) -> None:
    backlog(db_url, 1000)
    backlog(db_url, 1000, priority=5, users=10)  # enough higher work for three ticks
    [fresh] = backlog(db_url, 1, users=1)
    [old] = backlog(db_url, 1, users=1, waited=timedelta(seconds=90))  # aging limit: 60 s
    first = tick(db_url, instance)
    assert config_ids(first[0]) == [old]
    assert first[0].tags[RunTag.DAGSTER_PRIORITY] == str(MAX_PRIORITY)
    assert first[0].tags[RunTag.PRIORITY] == "0"
    assert {tuple(priorities_of(db_url, config_ids(r))) for r in first[1:]} == {(5,)}
    # The same low priority without the wait stays behind the higher work.
    tick(db_url, instance)
    assert status(db_url, fresh) == "pending"
    assert_one_priority_per_run(db_url, first)
