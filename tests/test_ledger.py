"""The credit ledger keeps its money invariants, alone and under concurrency, on both databases.

Proves, on real SQLite and PostgreSQL: grants, holds, captures and releases move exactly the
credits they say; amounts are validated; every call is idempotent by key and a reused key with
different terms raises IdempotencyConflict; a hold ends exactly once (capture vs release vs
expire); 32 threads racing for holds on an account that affords k of them get exactly k; capture
racing release on one hold has exactly one winner; concurrent refunds refund once; the database's
own constraints refuse a negative available balance and a second ending of a hold; ``verify``
finds corrupted caches and deleted entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Account, Hold, LedgerEntry, utcnow
from tests.support.db import emptied, migrated_database, race

T = TypeVar("T")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """One migrated database per dialect for this module (see tests/support/db.py)."""
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    """The module's database, emptied for this test."""
    return emptied(db_url)


def in_tx(engine: sa.Engine, fn: Callable[[Session], T]) -> T:
    with session_scope(engine) as session:
        return fn(session)


def bal(engine: sa.Engine, user: str) -> ledger.Balance:
    return in_tx(engine, lambda s: ledger.balance(s, user))


def assert_clean(engine: sa.Engine) -> None:
    assert [str(v) for v in in_tx(engine, ledger.verify)] == []


# --- grants -----------------------------------------------------------------------------------


def test_grant_creates_account_and_is_idempotent(engine: sa.Engine) -> None:
    first = in_tx(engine, lambda s: ledger.grant(s, "alice", 100, "g1"))
    again = in_tx(engine, lambda s: ledger.grant(s, "alice", 100, "g1"))
    assert again.id == first.id
    assert bal(engine, "alice") == ledger.Balance(balance=100, held=0, available=100)
    in_tx(engine, lambda s: ledger.grant(s, "alice", 50, "g2"))
    assert bal(engine, "alice").balance == 150
    assert_clean(engine)


def test_grant_key_reuse_with_other_terms_conflicts(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 100, "g1"))
    with pytest.raises(ledger.IdempotencyConflict, match="100 credits"):
        in_tx(engine, lambda s: ledger.grant(s, "alice", 99, "g1"))
    with pytest.raises(ledger.IdempotencyConflict, match="'bob'"):
        in_tx(engine, lambda s: ledger.grant(s, "bob", 100, "g1"))
    assert bal(engine, "alice").balance == 100
    with pytest.raises(ledger.UnknownAccount):
        bal(engine, "bob")


@pytest.mark.parametrize("amount", [True, 1.0, 2.5, -1, 0, 10**15 + 1, "5", None])
def test_grant_refuses_bad_amounts(engine: sa.Engine, amount: object) -> None:
    with pytest.raises(ledger.InvalidAmount, match="amount"):
        in_tx(engine, lambda s: ledger.grant(s, "alice", amount, "k"))  # type: ignore[arg-type]
    with pytest.raises(ledger.UnknownAccount):
        bal(engine, "alice")


def test_grant_accepts_the_maximum(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "whale", ledger.MAX_AMOUNT, "max"))
    assert bal(engine, "whale").available == 10**15


# --- holds ------------------------------------------------------------------------------------


def test_hold_reserves_and_reports_shortfall(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 10, "g"))
    h = in_tx(engine, lambda s: ledger.hold(s, "alice", 7, "h1", generation_id=42))
    assert (h.status, h.amount, h.generation_id) == ("pending", 7, 42)
    assert bal(engine, "alice") == ledger.Balance(balance=10, held=7, available=3)
    with pytest.raises(ledger.InsufficientCredits, match="3 available, 5 needed") as info:
        in_tx(engine, lambda s: ledger.hold(s, "alice", 5, "h2"))
    assert (info.value.available, info.value.needed) == (3, 5)
    with pytest.raises(ledger.UnknownAccount, match="nobody"):
        in_tx(engine, lambda s: ledger.hold(s, "nobody", 1, "h3"))
    assert_clean(engine)


def test_hold_is_idempotent_by_key(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 10, "g"))
    first = in_tx(engine, lambda s: ledger.hold(s, "alice", 8, "h1"))
    # The repeat returns the same hold although only 2 credits are available now.
    again = in_tx(engine, lambda s: ledger.hold(s, "alice", 8, "h1"))
    assert again.id == first.id
    assert bal(engine, "alice").held == 8
    with pytest.raises(ledger.IdempotencyConflict):
        in_tx(engine, lambda s: ledger.hold(s, "alice", 9, "h1"))
    with pytest.raises(ledger.IdempotencyConflict):
        in_tx(engine, lambda s: ledger.hold(s, "alice", 8, "h1", generation_id=5))
    assert_clean(engine)


# --- endings ----------------------------------------------------------------------------------


def _funded_hold(engine: sa.Engine, amount: int = 10, key: str = "h") -> int:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 100, f"grant-{key}"))
    return in_tx(engine, lambda s: ledger.hold(s, "alice", amount, key)).id


def test_capture_spends_part_and_returns_the_rest(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    entry = in_tx(engine, lambda s: ledger.capture(s, hold_id, 6))
    assert (entry.kind, entry.amount, entry.balance_delta, entry.held_delta) == (
        "capture",
        6,
        -6,
        -10,
    )
    assert bal(engine, "alice") == ledger.Balance(balance=94, held=0, available=94)
    again = in_tx(engine, lambda s: ledger.capture(s, hold_id, 6))
    assert again.id == entry.id
    with pytest.raises(ledger.IdempotencyConflict):
        in_tx(engine, lambda s: ledger.capture(s, hold_id, 7))
    with pytest.raises(ledger.HoldAlreadyEnded) as info:
        in_tx(engine, lambda s: ledger.release(s, hold_id, "late refund"))
    assert info.value.status == "captured" and info.value.ending.entry_id == entry.id
    assert in_tx(engine, lambda s: ledger.release_if_pending(s, hold_id, "late")) is False
    assert bal(engine, "alice").balance == 94
    assert_clean(engine)


def test_capture_cannot_exceed_the_hold(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    with pytest.raises(ledger.InvalidAmount, match="11"):
        in_tx(engine, lambda s: ledger.capture(s, hold_id, 11))
    with pytest.raises(ledger.UnknownHold):
        in_tx(engine, lambda s: ledger.capture(s, 999_999, 1))
    assert bal(engine, "alice").held == 10


def test_capture_of_zero_releases_everything(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    in_tx(engine, lambda s: ledger.capture(s, hold_id, 0))
    assert bal(engine, "alice") == ledger.Balance(balance=100, held=0, available=100)
    assert_clean(engine)


def test_release_returns_everything_once(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    entry = in_tx(engine, lambda s: ledger.release(s, hold_id, "model failed"))
    assert (entry.kind, entry.amount, entry.memo) == ("release", 10, "model failed")
    assert in_tx(engine, lambda s: ledger.release(s, hold_id, "again")).id == entry.id
    with pytest.raises(ledger.HoldAlreadyEnded, match="released"):
        in_tx(engine, lambda s: ledger.capture(s, hold_id, 5))
    assert bal(engine, "alice") == ledger.Balance(balance=100, held=0, available=100)
    assert_clean(engine)


def test_release_if_pending_refunds_once(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    assert in_tx(engine, lambda s: ledger.release_if_pending(s, hold_id, "run failed")) is True
    assert in_tx(engine, lambda s: ledger.release_if_pending(s, hold_id, "sensor")) is False
    entries = in_tx(
        engine, lambda s: s.scalars(sa.select(LedgerEntry.kind).order_by(LedgerEntry.id)).all()
    )
    assert entries == ["grant", "hold", "release"]


def test_expire_releases_holds_past_their_deadline(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 100, "g"))
    old = in_tx(engine, lambda s: ledger.hold(s, "alice", 10, "old", ttl=timedelta(minutes=5)))
    fresh = in_tx(engine, lambda s: ledger.hold(s, "alice", 20, "fresh", ttl=timedelta(hours=2)))
    later = utcnow() + timedelta(minutes=10)
    expired = in_tx(engine, lambda s: ledger.expire(s, now=later))
    assert [h.id for h in expired] == [old.id]
    assert expired[0].status == "expired"
    assert in_tx(engine, lambda s: ledger.expire(s, now=later)) == []
    assert bal(engine, "alice") == ledger.Balance(balance=100, held=20, available=80)
    # The money already went back: a late release agrees, a late capture is refused.
    assert in_tx(engine, lambda s: ledger.release(s, old.id, "late")).kind == "expire"
    with pytest.raises(ledger.HoldAlreadyEnded, match="expired"):
        in_tx(engine, lambda s: ledger.capture(s, old.id, 10))
    assert in_tx(engine, lambda s: s.get_one(Hold, fresh.id).status) == "pending"
    assert_clean(engine)


def test_ledger_moves_commit_with_the_callers_transaction(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 10, "g"))
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        ledger.hold(session, "alice", 10, "h")
        raise RuntimeError("the generation update failed")
    assert bal(engine, "alice").held == 0
    assert in_tx(engine, lambda s: s.scalar(sa.select(sa.func.count()).select_from(Hold))) == 0


# --- the database's own guards -----------------------------------------------------------------


def test_check_constraint_refuses_negative_available(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 10, "g"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET held = 11 WHERE user_id = 'alice'"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET balance = -1 WHERE user_id = 'alice'"))
    assert bal(engine, "alice") == ledger.Balance(balance=10, held=0, available=10)


def test_partial_unique_index_refuses_a_second_ending(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    in_tx(engine, lambda s: ledger.capture(s, hold_id, 10))
    account_id = in_tx(engine, lambda s: s.get_one(Hold, hold_id).account_id)
    insert = sa.text(
        "INSERT INTO ledger_entries (account_id, hold_id, kind, amount, balance_delta,"
        " held_delta, idempotency_key) VALUES (:a, :h, :k, 10, 0, -10, :key)"
    )
    for kind in ("release", "expire", "capture", "hold"):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"a": account_id, "h": hold_id, "k": kind, "key": f"x-{kind}"})


# --- verify -----------------------------------------------------------------------------------


def test_verify_finds_a_corrupted_cached_balance(engine: sa.Engine) -> None:
    _funded_hold(engine, 10)
    assert_clean(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET balance = balance + 5 WHERE user_id = 'alice'"))
    messages = [str(v) for v in in_tx(engine, ledger.verify)]
    assert messages == [
        "account 1 (user 'alice'): cached balance 105 != 100, the sum of its ledger entries"
    ]


def test_verify_finds_a_deleted_entry(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    with engine.begin() as conn:
        conn.execute(
            sa.text("DELETE FROM ledger_entries WHERE hold_id = :h AND kind = 'hold'"),
            {"h": hold_id},
        )
    violations = in_tx(engine, ledger.verify)
    text = "\n".join(map(str, violations))
    assert f"hold {hold_id}: has 0 'hold' entries, expected exactly 1" in text
    assert "cached held 10 != 0, the sum of its entries' held deltas" in text
    assert any(v.hold_id == hold_id for v in violations)


def test_verify_finds_a_status_that_disagrees_with_entries(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    in_tx(engine, lambda s: ledger.release(s, hold_id, "x"))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE holds SET status = 'expired' WHERE id = :h"), {"h": hold_id})
    text = "\n".join(map(str, in_tx(engine, ledger.verify)))
    assert f"hold {hold_id}: is expired but its ending entry is release" in text


# --- concurrency ------------------------------------------------------------------------------


def test_a_hold_after_a_rolled_back_one_is_the_new_hold(engine: sa.Engine) -> None:
    # Regression: on SQLite a rolled-back hold's id is reused, and hold() answered the session's
    # stale object of the rolled-back hold (its amount and key) instead of the new one.
    in_tx(engine, lambda s: ledger.grant(s, "alice", 100, "g"))
    with session_scope(engine) as session:
        with session.begin_nested() as savepoint:
            ledger.hold(session, "alice", 5, "k1")
            savepoint.rollback()
        held = ledger.hold(session, "alice", 7, "k2")
        assert (held.amount, held.idempotency_key) == (7, "k2")
    assert bal(engine, "alice").held == 7
    assert_clean(engine)


def test_32_threads_racing_for_holds_get_exactly_what_is_affordable(engine: sa.Engine) -> None:
    affordable, price = 11, 7
    in_tx(engine, lambda s: ledger.grant(s, "alice", affordable * price + price - 1, "g"))

    def take(i: int) -> Hold:
        return in_tx(engine, lambda s: ledger.hold(s, "alice", price, f"race-{i}"))

    results = race(32, take)
    won = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if isinstance(r, ledger.InsufficientCredits)]
    assert len(won) == affordable, [r for r in results if isinstance(r, BaseException)][:3]
    assert len(refused) == 32 - affordable
    assert bal(engine, "alice") == ledger.Balance(
        balance=affordable * price + price - 1, held=affordable * price, available=price - 1
    )
    assert_clean(engine)


def test_capture_racing_release_has_exactly_one_winner(engine: sa.Engine) -> None:
    in_tx(engine, lambda s: ledger.grant(s, "alice", 10_000, "g"))
    captures = 0
    for round_ in range(15):
        hold_id = in_tx(engine, lambda s, r=round_: ledger.hold(s, "alice", 10, f"h{r}")).id

        def end(i: int, hold_id: int = hold_id) -> str:
            if i == 0:
                return in_tx(engine, lambda s: ledger.capture(s, hold_id, 4)).kind
            return in_tx(engine, lambda s: ledger.release(s, hold_id, "refund")).kind

        results = race(2, end)
        winners = [r for r in results if isinstance(r, str)]
        losers = [r for r in results if isinstance(r, ledger.HoldAlreadyEnded)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert losers[0].ending.kind == winners[0]
        captures += winners[0] == "capture"
    assert bal(engine, "alice") == ledger.Balance(
        balance=10_000 - 4 * captures, held=0, available=10_000 - 4 * captures
    )
    assert_clean(engine)


def test_concurrent_refund_paths_refund_exactly_once(engine: sa.Engine) -> None:
    hold_id = _funded_hold(engine, 10)
    results = race(
        8, lambda i: in_tx(engine, lambda s: ledger.release_if_pending(s, hold_id, f"path {i}"))
    )
    assert sorted(results, key=str) == [False] * 7 + [True]
    releases = in_tx(
        engine,
        lambda s: s.scalar(
            sa.select(sa.func.count()).where(
                LedgerEntry.hold_id == hold_id, LedgerEntry.kind == "release"
            )
        ),
    )
    assert releases == 1
    assert_clean(engine)


def test_concurrent_duplicates_have_one_effect(engine: sa.Engine) -> None:
    # Same grant key from 16 threads for a user that does not exist yet: one account, one grant.
    grants = race(16, lambda i: in_tx(engine, lambda s: ledger.grant(s, "carol", 50, "dup-g")).id)
    assert len(set(grants)) == 1, grants
    holds = race(16, lambda i: in_tx(engine, lambda s: ledger.hold(s, "carol", 20, "dup-h")).id)
    assert len(set(holds)) == 1, holds
    assert bal(engine, "carol") == ledger.Balance(balance=50, held=20, available=30)
    assert in_tx(engine, lambda s: s.scalar(sa.select(sa.func.count()).select_from(Account))) == 1
    assert_clean(engine)


def test_concurrent_same_key_for_two_users_conflicts(engine: sa.Engine) -> None:
    # The two calls lock different accounts, so only the unique index decides (SAVEPOINT path).
    for user in ("u0", "u1"):
        in_tx(engine, lambda s, u=user: ledger.grant(s, u, 10, f"g-{u}"))
    results = race(2, lambda i: in_tx(engine, lambda s: ledger.hold(s, f"u{i}", 5, "shared")))
    assert sum(isinstance(r, Hold) for r in results) == 1, results
    assert sum(isinstance(r, ledger.IdempotencyConflict) for r in results) == 1, results
    assert bal(engine, "u0").held + bal(engine, "u1").held == 5
    assert_clean(engine)
