"""Priorities are the operator's to give, and a refused priority writes nothing.

Proves, on real SQLite and PostgreSQL: a request without a priority gets its user's ceiling
(the operator's value, else ``AI_HANDLER_DEFAULT_PRIORITY``); any priority up to the ceiling is
kept; the refusal matrix (above the ceiling, out of range, not a whole number) ends with
``InvalidRequest`` naming the problem and no row, hold or entry written; a repeated
``request_id`` with another priority is refused; a row an application inserts above its user's
ceiling fails ``invalid_request`` at ``start_attempt`` before anything is held; the database's
CHECK constraints refuse a priority or a ceiling out of range; ceilings can be set, replaced,
listed and unset. Through ``cli.main`` on SQLite: ``priority set|list|unset`` and ``submit
--priority`` work, and bad values end with ``error: ...`` and exit code 2, nothing written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ai_handler_dagster import cli, ledger, priorities
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import dispose_engines, make_engine, session_scope
from ai_handler_dagster.db.models import Generation, Hold, LedgerEntry, UserPriority
from ai_handler_dagster.pricing import PriceBook, load_pricing
from tests.support.db import emptied, migrated_database

T = TypeVar("T")
SKETCH = "demo/pixel-sketch"  # 5 credits per image, one by default


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    monkeypatch.delenv("AI_HANDLER_DEFAULT_PRIORITY", raising=False)
    return emptied(db_url)


@pytest.fixture(scope="module")
def prices() -> PriceBook:
    return load_pricing()


def tx(engine: sa.Engine, fn: Callable[[Session], T]) -> T:
    with session_scope(engine) as session:
        return fn(session)


def fund(engine: sa.Engine, user: str = "alice") -> None:
    tx(engine, lambda s: ledger.grant(s, user, 100, f"fund-{user}"))


def ceiling(engine: sa.Engine, user: str, value: int) -> None:
    tx(engine, lambda s: priorities.set_ceiling(s, user, value))


def submit(engine: sa.Engine, prices: PriceBook, user: str = "alice", **kw: Any) -> Generation:
    kw.setdefault("input", {"prompt": "a red fox"})
    return tx(engine, lambda s: gens.submit(s, user_id=user, model=SKETCH, prices=prices, **kw))


def count(engine: sa.Engine, model: type[Any]) -> int:
    return tx(engine, lambda s: s.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def test_a_request_without_a_priority_gets_its_users_ceiling(
    engine: sa.Engine, prices: PriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    fund(engine, "alice")
    fund(engine, "bob")
    ceiling(engine, "alice", 5)
    assert submit(engine, prices, "alice").priority == 5
    assert submit(engine, prices, "bob").priority == 0  # not listed: the default, 0
    monkeypatch.setenv("AI_HANDLER_DEFAULT_PRIORITY", "2")
    assert submit(engine, prices, "bob").priority == 2
    assert submit(engine, prices, "alice").priority == 5  # a listed user keeps the operator's


def test_any_priority_up_to_the_ceiling_is_kept(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    ceiling(engine, "alice", 5)
    assert [submit(engine, prices, priority=p).priority for p in (0, 3, 5)] == [0, 3, 5]


@pytest.mark.parametrize(
    ("priority", "user_ceiling", "message"),
    [
        (6, 5, "priority 6 is above the highest 'alice' may ask for (5"),
        (1, None, "priority 1 is above the highest 'alice' may ask for (0"),
        (9, 8, "priority 9 is above the highest 'alice' may ask for (8"),
        (10, 9, "priority must be from 0 to 9, got 10"),
        (-1, 5, "priority must be from 0 to 9, got -1"),
        (True, 5, "priority must be a whole number from 0 to 9, got True"),
        (2.0, 5, "priority must be a whole number from 0 to 9, got 2.0"),
        ("3", 5, "priority must be a whole number from 0 to 9, got '3'"),
    ],
)
def test_a_refused_priority_writes_nothing(
    engine: sa.Engine, prices: PriceBook, priority: Any, user_ceiling: int | None, message: str
) -> None:
    fund(engine)
    if user_ceiling is not None:
        ceiling(engine, "alice", user_ceiling)
    entries = count(engine, LedgerEntry)
    with pytest.raises(gens.InvalidRequest) as refused:
        submit(engine, prices, priority=priority)
    assert message in str(refused.value)
    assert count(engine, Generation) == 0
    assert count(engine, Hold) == 0
    assert count(engine, LedgerEntry) == entries
    assert tx(engine, lambda s: ledger.balance(s, "alice")).held == 0


def test_a_repeated_request_id_with_another_priority_is_refused(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    ceiling(engine, "alice", 5)
    first = submit(engine, prices, priority=2, request_id="r-1")
    assert submit(engine, prices, priority=2, request_id="r-1").id == first.id
    assert submit(engine, prices, request_id="r-1").id == first.id  # none named: the same row
    with pytest.raises(gens.InvalidRequest, match="different user, model, input or priority"):
        submit(engine, prices, priority=3, request_id="r-1")
    assert count(engine, Generation) == 1


def inserted(engine: sa.Engine, priority: int, user: str = "alice") -> int:
    def add(session: Session) -> int:
        row = Generation(user_id=user, model=SKETCH, input={"prompt": "x"}, priority=priority)
        session.add(row)
        session.flush()
        return row.id

    return tx(engine, add)


def test_an_inserted_row_above_its_users_ceiling_fails_before_any_hold(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    ceiling(engine, "alice", 3)
    above, within = inserted(engine, 7), inserted(engine, 3)
    failed = tx(engine, lambda s: gens.start_attempt(s, above, run_id="r", prices=prices))
    assert (failed.status, failed.error_code, failed.hold_id) == ("failed", "invalid_request", None)
    assert "priority 7 is above the highest 'alice' may ask for (3" in (failed.error_message or "")
    running = tx(engine, lambda s: gens.start_attempt(s, within, run_id="r", prices=prices))
    assert running.status == "running"
    assert tx(engine, lambda s: ledger.balance(s, "alice")).held == 5  # only the one within


def test_a_requeued_generation_keeps_its_priority_after_the_ceiling_is_lowered(
    engine: sa.Engine, prices: PriceBook
) -> None:
    """Regression: start_attempt checked every row without a hold against the user's current
    ceiling, requeued ones included (requeue clears the hold), so lowering a ceiling failed the
    user's regenerates and reprocessing with invalid_request, although requests already
    submitted keep their priority."""
    fund(engine)
    ceiling(engine, "alice", 5)
    gid = submit(engine, prices, priority=5).id
    tx(engine, lambda s: gens.start_attempt(s, gid, run_id="r1", prices=prices))
    tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="the model failed"))
    ceiling(engine, "alice", 1)
    requeued = tx(engine, lambda s: gens.requeue(s, gid))
    assert (requeued.attempt, requeued.hold_id, requeued.priority) == (2, None, 5)
    again = tx(engine, lambda s: gens.start_attempt(s, gid, run_id="r2", prices=prices))
    assert (again.status, again.error_code, again.priority) == ("running", None, 5)
    assert again.hold_id is not None


@pytest.mark.parametrize("value", [-1, 10])
def test_the_database_refuses_a_priority_or_a_ceiling_out_of_range(
    engine: sa.Engine, value: int
) -> None:
    with pytest.raises(IntegrityError, match="priority_range"):
        inserted(engine, value)
    with pytest.raises(IntegrityError, match="max_priority_range"), engine.begin() as conn:
        conn.execute(sa.insert(UserPriority).values(user_id="alice", max_priority=value))


def test_ceilings_are_set_replaced_listed_and_unset(engine: sa.Engine) -> None:
    ceiling(engine, "bob", 2)
    ceiling(engine, "alice", 5)
    ceiling(engine, "alice", 7)
    listed = tx(engine, lambda s: [(r.user_id, r.max_priority) for r in priorities.listed(s)])
    assert listed == [("alice", 7), ("bob", 2)]
    assert tx(engine, lambda s: priorities.ceiling(s, "alice")) == 7
    assert tx(engine, lambda s: priorities.unset_ceiling(s, "alice")) is True
    assert tx(engine, lambda s: priorities.unset_ceiling(s, "alice")) is False
    assert tx(engine, lambda s: priorities.ceiling(s, "alice")) == 0
    for bad in (10, -1, True, "5"):
        with pytest.raises(priorities.PriorityRefused, match="the ceiling must be"):
            ceiling(engine, "carol", bad)  # type: ignore[arg-type]
    with pytest.raises(priorities.PriorityRefused, match="user must be a non-empty string"):
        ceiling(engine, " ", 1)
    assert count(engine, UserPriority) == 1


# --- the command line (SQLite) ----------------------------------------------------------------


@pytest.fixture
def cli_db(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AI_HANDLER_DATABASE_URL", sqlite_url)
    monkeypatch.delenv("AI_HANDLER_PRICING_FILE", raising=False)
    monkeypatch.delenv("AI_HANDLER_DEFAULT_PRIORITY", raising=False)
    assert cli.main(["db", "upgrade"]) == 0
    assert cli.main(["credits", "grant", "alice", "100"]) == 0
    yield sqlite_url
    dispose_engines()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_priority_commands_set_list_and_unset(
    cli_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "priority", "set", "alice", "5") == (0, "alice: highest priority 5\n", "")
    assert run(capsys, "priority", "set", "bob", "1")[0] == 0
    code, out, _ = run(capsys, "priority", "list")
    assert code == 0
    assert out == "alice\t5\nbob\t1\n(every other user: 0, AI_HANDLER_DEFAULT_PRIORITY)\n"
    code, out, _ = run(capsys, "priority", "list", "--json")
    assert json.loads(out) == {"default": 0, "users": {"alice": 5, "bob": 1}}
    code, out, _ = run(capsys, "priority", "unset", "bob")
    assert (code, out) == (0, "bob: ceiling removed; the default applies (0)\n")
    for bad, message in (("10", "from 0 to 9, got 10"), ("x", "whole number"), ("-1", "-1")):
        code, out, err = run(capsys, "priority", "set", "alice", bad)
        assert (code, out) == (2, "")
        assert err.startswith("error: ") and message in err
    assert json.loads(run(capsys, "priority", "list", "--json")[1])["users"] == {"alice": 5}


def test_submit_with_a_priority_from_the_command_line(
    cli_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "priority", "set", "alice", "5")[0] == 0
    request = ("submit", "--user", "alice", "--model", SKETCH, "--input", '{"prompt": "a fox"}')
    code, out, err = run(capsys, *request, "--priority", "6")
    assert (code, out) == (2, "")
    assert "error: priority 6 is above the highest 'alice' may ask for (5" in err
    code, _, err = run(capsys, *request, "--priority", "high")
    assert code == 2 and "--priority must be a whole number, got 'high'" in err
    with make_engine(cli_db).connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM generations").scalar() == 0
    code, out, _ = run(capsys, *request, "--priority", "4")
    assert code == 0
    status = json.loads(run(capsys, "status", out.strip())[1])
    assert (status["priority"], status["status"]) == (4, "pending")
    code, out, _ = run(capsys, *request)
    assert json.loads(run(capsys, "status", out.strip())[1])["priority"] == 5
