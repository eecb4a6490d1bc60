"""The create step under the deployment's create throttle, against the rate-limited emulator,
on SQLite and PostgreSQL.

Proves that a batch larger than the provider's burst waits for its turns and every generation
succeeds, paid once, with no create answered 429 (the throttle paces them); and that the only
way out of the wait is the queue deadline: a generation whose turn would come after it fails with
``deadline_exceeded`` and is refunded, and none fails for rate limiting; and that the wait is not
taken out of the prediction's own deadline.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation
from ai_handler_dagster.devstack.emulator import EmulatorHandle
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.replicate.snapshot import parse_time
from tests.support.orchestration import grant, run_pending, submit

pytestmark = pytest.mark.usefixtures("aws_env")


def _limit(monkeypatch: pytest.MonkeyPatch, emulator: EmulatorHandle, per_min: int, burst: int):
    """The provider's create limit enforced by the emulator, and the same limit configured."""
    emulator.configure(rate_limit=True, creates_per_minute=per_min, creates_burst=burst)
    monkeypatch.setenv("AI_HANDLER_CREATE_RATE_PER_MIN", str(per_min))
    monkeypatch.setenv("AI_HANDLER_CREATE_BURST", str(burst))


def _rows(db_url: str, ids: list[int]) -> list[Generation]:
    with session_scope(make_engine(db_url)) as session:
        rows = list(session.scalars(sa.select(Generation).where(Generation.id.in_(ids))))
        session.expunge_all()
    return sorted(rows, key=lambda r: r.id)


def _clean(db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        assert ledger.verify(session) + gens.verify(session) == []


def test_a_batch_beyond_the_burst_waits_its_turns_and_every_generation_succeeds(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _limit(monkeypatch, emulator, per_min=120, burst=2)  # two at once, then one per 0.5 s
    grant(app_db, "ada", 1000)
    ids = submit(app_db, "ada", [("demo/pixel-sketch", {"prompt": f"paced {i}"}) for i in range(6)])
    started = time.monotonic()
    run_pending(app_db, emulator, local_s3, bucket, instance)
    assert time.monotonic() - started >= 4 * 0.5  # four turns after the burst
    assert [r.status for r in _rows(app_db, ids)] == ["succeeded"] * 6
    stats = emulator.stats()
    assert stats["creates"] == 6 and stats["rate_limited"] == 0
    _clean(app_db)


def test_only_the_queue_deadline_ends_the_wait_and_it_refunds(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _limit(monkeypatch, emulator, per_min=6, burst=1)  # one turn, the next 10 s later:
    # past the 8 s allowance
    monkeypatch.setenv("AI_HANDLER_QUEUE_ALLOWANCE_S", "8")
    grant(app_db, "ada", 1000)
    ids = submit(app_db, "ada", [("demo/pixel-sketch", {"prompt": f"late {i}"}) for i in range(3)])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    rows = _rows(app_db, ids)
    assert sorted(r.status for r in rows) == ["failed", "failed", "succeeded"], [
        (r.status, r.error_code, r.error_message) for r in rows
    ]
    late = [r for r in rows if r.status == "failed"]
    assert {r.error_code for r in late} == {"deadline_exceeded"}
    assert all(r.amount_charged == 0 and r.prediction_id is None for r in late)
    assert emulator.stats()["creates"] == 1 and emulator.stats()["rate_limited"] == 0
    with session_scope(make_engine(app_db)) as session:
        account = ledger.balance(session, "ada")
    assert account.held == 0
    _clean(app_db)


def test_the_wait_for_a_turn_is_not_taken_out_of_the_prediction_deadline(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: an attempt's first create time (``create_attempts.started_at``, where the
    prediction deadline counts from) was stamped when the step began, before the turn; a
    generation that waited longer than its deadline for its turn was created, paid, then
    canceled at once and refunded with ``deadline_exceeded``, though waiting never fails one."""
    _limit(monkeypatch, emulator, per_min=6, burst=1)  # the second turn about 10.3 s later
    monkeypatch.setenv("AI_HANDLER_PREDICTION_DEADLINE_S", "10")
    monkeypatch.setenv("AI_HANDLER_QUEUE_ALLOWANCE_S", "120")
    grant(app_db, "ada", 1000)
    ids = submit(app_db, "ada", [("demo/pixel-sketch", {"prompt": f"wait {i}"}) for i in range(2)])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    rows = _rows(app_db, ids)
    assert [r.status for r in rows] == ["succeeded"] * 2, [
        (r.status, r.error_code, r.error_message) for r in rows
    ]
    created = {p["id"]: parse_time(p["created_at"]) for p in emulator.predictions()}
    with session_scope(make_engine(app_db)) as session:
        attempts = list(session.scalars(sa.select(CreateAttempt)))
        session.expunge_all()
    first, second = sorted(attempts, key=lambda a: a.started_at)
    # Stamped when each create was sent: the second after its wait, and never after the
    # provider made its prediction (the adoption window must cover the real create).
    assert (second.started_at - first.started_at).total_seconds() >= 9.5
    for a in attempts:
        made = created[a.prediction_id]
        assert made is not None and 0 <= made - a.started_at.timestamp() < 1.0
    assert emulator.stats()["rate_limited"] == 0
    _clean(app_db)
