"""The request sensor in Dagster's style: first tick, nothing new, new rows, batch sizing, run keys.

Rows are inserted straight into the table, as an application would. Proves that each batch gets a
run key derived from its first generation attempt, that rows move to ``queued`` with that key, that
a re-tick launches nothing twice, that batch sizes follow the backlog, and that the in-flight cap
holds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, RunRequest, SensorResult, SkipReason, build_sensor_context

from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.domain import RunTag
from ai_handler_dagster.orchestration.request_sensor import (
    QueuePolicy,
    generation_request_sensor,
    plan_batches,
)
from ai_handler_dagster.resources.database import DatabaseResource
from ai_handler_dagster.runtime import wake


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    return sqlite_url


def insert_rows(url: str, count: int, *, user: str = "alice", status: str = "pending") -> list[int]:
    with session_scope(make_engine(url)) as session:
        rows = [
            Generation(
                user_id=user,
                model="demo/pixel-sketch",
                input={"prompt": f"picture {i}"},
                status=status,
            )
            for i in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def tick(url: str, instance: DagsterInstance) -> SensorResult | SkipReason:
    context = build_sensor_context(
        instance=instance, resources={"database": DatabaseResource(url=url)}
    )
    result = generation_request_sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return result


def statuses(url: str) -> dict[int, tuple[str, str | None]]:
    with session_scope(make_engine(url)) as session:
        return {
            r.id: (r.status, r.batch_key)
            for r in session.scalars(sa.select(Generation).order_by(Generation.id))
        }


def config_ids(request: RunRequest) -> list[int]:
    return request.run_config["ops"]["reserve_credits"]["config"]["generation_ids"]


@pytest.fixture
def instance() -> DagsterInstance:
    return DagsterInstance.ephemeral()


def test_first_tick_with_no_requests_skips(db_url: str, instance: DagsterInstance) -> None:
    result = tick(db_url, instance)
    assert isinstance(result, SkipReason)
    assert "No pending" in (result.skip_message or "")


def test_new_rows_get_one_run_each_when_the_queue_is_short(
    db_url: str, instance: DagsterInstance
) -> None:
    ids = insert_rows(db_url, 2)
    result = tick(db_url, instance)
    assert isinstance(result, SensorResult)
    requests = result.run_requests or []
    assert [r.run_key for r in requests] == [f"gen-{ids[0]}-a1", f"gen-{ids[1]}-a1"]
    assert [config_ids(r) for r in requests] == [[ids[0]], [ids[1]]]
    assert requests[0].tags[RunTag.BATCH] == requests[0].run_key
    assert requests[0].tags["ai_handler/user"] == "alice"
    assert requests[0].tags["ai_handler/batch_size"] == "1"
    assert statuses(db_url) == {
        ids[0]: ("queued", f"gen-{ids[0]}-a1"),
        ids[1]: ("queued", f"gen-{ids[1]}-a1"),
    }


def test_a_second_tick_launches_nothing_again(db_url: str, instance: DagsterInstance) -> None:
    insert_rows(db_url, 1)
    assert isinstance(tick(db_url, instance), SensorResult)
    again = tick(db_url, instance)
    assert isinstance(again, SkipReason)


def test_long_backlog_is_batched_and_bounded(
    db_url: str, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_HANDLER_MAX_BATCH", "8")
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT", "40")
    ids = insert_rows(db_url, 100)
    result = tick(db_url, instance)
    assert isinstance(result, SensorResult)
    requests = result.run_requests or []
    sizes = [len(config_ids(r)) for r in requests]
    assert sizes == [8] * 5  # 40 allowed in flight, in full batches of 8
    launched = [i for r in requests for i in config_ids(r)]
    assert launched == ids[:40]
    assert all(r.run_key == f"gen-{config_ids(r)[0]}-a1" for r in requests)
    queued = [gid for gid, (status, _) in statuses(db_url).items() if status == "queued"]
    assert queued == ids[:40]
    # The cap is reached: the next tick says so instead of launching more.
    capped = tick(db_url, instance)
    assert isinstance(capped, SkipReason)
    assert "in flight" in (capped.skip_message or "")


def test_a_claimed_batch_without_a_run_is_requested_again_with_the_same_key(
    db_url: str, instance: DagsterInstance
) -> None:
    ids = insert_rows(db_url, 1)
    first = tick(db_url, instance)
    assert isinstance(first, SensorResult)
    # Pretend the tick crashed after committing: the batch is old and no run recorded it.
    with session_scope(make_engine(db_url)) as session:
        session.execute(
            sa.update(Generation).values(queued_at=datetime.now(UTC) - timedelta(minutes=5))
        )
    again = tick(db_url, instance)
    assert isinstance(again, SensorResult)
    assert [r.run_key for r in again.run_requests or []] == [f"gen-{ids[0]}-a1"]


@pytest.mark.parametrize(
    ("pending", "in_flight", "expected"),
    [
        (0, 0, []),
        (3, 0, [1, 1, 1]),
        (4, 0, [1, 1, 1, 1]),
        (5, 0, [5]),
        (40, 0, [20, 20]),
        (1000, 0, [32, 32, 32, 32]),
        (1000, 100, [28]),
        (1000, 120, []),  # room for 8 only: wait for a fuller batch
        (10, 120, [8]),  # room for most of a short queue: it goes out
        (10, 126, []),
        (1000, 128, []),
        (300, 0, [32, 32, 32, 32]),
    ],
)
def test_batch_plan_follows_the_backlog(pending: int, in_flight: int, expected: list[int]) -> None:
    policy = QueuePolicy(max_batch=32, max_in_flight=128, small_backlog=4, max_runs_per_tick=8)
    assert plan_batches(pending, in_flight, policy) == expected


def test_users_take_turns_and_one_backlog_cannot_starve_another(
    db_url: str, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: claiming strictly oldest-first let a user with thousands of queued requests
    hold every slot; later users waited for the whole backlog."""
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT", "40")
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT_PER_USER", "10")
    heavy = insert_rows(db_url, 30, user="heavy")
    light = insert_rows(db_url, 3, user="light")
    result = tick(db_url, instance)
    assert isinstance(result, SensorResult)
    launched = {i for r in result.run_requests or [] for i in config_ids(r)}
    assert launched == set(heavy[:10]) | set(light)
    # The heavy user is at its cap: nothing more for it until its generations finish.
    again = tick(db_url, instance)
    assert isinstance(again, SkipReason)
    with session_scope(make_engine(db_url)) as session:
        session.execute(
            sa.update(Generation).where(Generation.id.in_(heavy[:4])).values(status="succeeded")
        )
    third = tick(db_url, instance)
    assert isinstance(third, SensorResult)
    assert {i for r in third.run_requests or [] for i in config_ids(r)} == set(heavy[10:14])


def test_the_cursor_tells_the_daemon_whether_a_wake_up_may_start_the_next_tick(
    db_url: str, instance: DagsterInstance
) -> None:
    """runtime/wake.py brings a tick forward only after a quiet one: with at most
    AI_HANDLER_SMALL_BACKLOG (4) generations pending, queued or running. Regression: every
    wake-up started a tick, so at a few requests a second each tick claimed one or two and
    launched a run for each instead of batching them."""

    def cursor_after_tick() -> str | None:
        context = build_sensor_context(
            instance=instance, resources={"database": DatabaseResource(url=db_url)}
        )
        generation_request_sensor(context)
        return context.cursor

    assert cursor_after_tick() == wake.QUIET_CURSOR  # nothing at all
    insert_rows(db_url, 3)
    assert cursor_after_tick() == wake.QUIET_CURSOR  # 3 pending, claimed by this tick
    insert_rows(db_url, 1)
    assert cursor_after_tick() == wake.QUIET_CURSOR  # 1 pending and 3 in flight: 4
    insert_rows(db_url, 1)
    assert cursor_after_tick() == wake.BUSY_CURSOR  # 1 pending and 4 in flight: 5
    # Still 5 in flight, nothing pending: busy until the runs end.
    assert cursor_after_tick() == wake.BUSY_CURSOR
