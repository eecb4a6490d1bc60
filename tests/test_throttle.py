"""The create throttle: one pace of creates for every run, process and host.

Pure units of the bucket's arithmetic (turns, refill, blocks, the provider's remaining count).
On real SQLite and PostgreSQL: many threads, and many processes, racing for turns never start
more creates than a bucket of the same rate and burst lets through; a turn past the deadline is
refused without being promised; a 429 holds every waiting create back, even one whose turn was
promised before it.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from ai_handler_dagster import db, errors
from ai_handler_dagster.db.engine import dispose_engines, make_engine
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.settings import ConfigError
from ai_handler_dagster.throttle import ARRIVAL_S, PACE, Bucket, CreateThrottle, Interrupted, Limits

# --- the arithmetic ------------------------------------------------------------------------------

LIMITS = Limits(per_minute=60 / PACE, burst=3)  # one token a second, three at once


def test_the_pace_is_a_little_under_the_configured_limit() -> None:
    assert Limits(600, 600).rate_s == pytest.approx(600 * PACE / 60)
    assert 0.95 <= PACE < 1


def test_the_limits_default_to_replicates_and_are_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AI_HANDLER_CREATE_RATE_PER_MIN", raising=False)
    monkeypatch.delenv("AI_HANDLER_CREATE_BURST", raising=False)
    assert Limits.from_settings() == Limits(600, 600)
    monkeypatch.setenv("AI_HANDLER_CREATE_RATE_PER_MIN", "6")
    assert Limits.from_settings() == Limits(6, 6)  # the burst: a minute's worth
    monkeypatch.setenv("AI_HANDLER_CREATE_BURST", "1")
    assert Limits.from_settings() == Limits(6, 1)
    monkeypatch.setenv("AI_HANDLER_CREATE_BURST", "0")
    with pytest.raises(ConfigError, match="AI_HANDLER_CREATE_BURST"):
        Limits.from_settings()


def test_a_full_bucket_gives_its_burst_at_once_then_one_turn_per_token() -> None:
    bucket = Bucket.full(LIMITS, now=100.0)
    turns = []
    for _ in range(6):
        turn, bucket = bucket.take(LIMITS, now=100.0)
        turns.append(turn)
    # The refill starts when the first create reaches the provider, not at its turn.
    paced = [101.0 + ARRIVAL_S, 102.0 + ARRIVAL_S, 103.0 + ARRIVAL_S]
    assert turns == pytest.approx([100.0, 100.0, 100.0, *paced])
    assert bucket.tokens == pytest.approx(-3.0)  # three turns promised ahead


def test_refill_stops_at_the_burst() -> None:
    bucket = Bucket(tokens=0.0, updated_at=0.0)
    assert bucket.refilled(LIMITS, 1.5).tokens == pytest.approx(1.5)
    assert bucket.refilled(LIMITS, 1000.0).tokens == pytest.approx(3.0)
    assert bucket.refilled(LIMITS, -5.0) == bucket  # a clock behind the row changes nothing


def test_a_block_holds_every_turn_back_then_paces_without_a_burst() -> None:
    bucket = Bucket.full(LIMITS, now=0.0).block(until=10.0)
    turns = []
    for _ in range(3):
        turn, bucket = bucket.take(LIMITS, now=1.0)
        turns.append(turn)
    assert turns == pytest.approx([10.0, 11.0, 12.0])
    # A shorter block, reported later by a slower answer, does not shorten it or void turns.
    assert bucket.block(until=5.0) == bucket
    assert bucket.block(until=10.0) == bucket


def test_the_provider_remaining_count_only_ever_lowers_the_tokens() -> None:
    bucket = Bucket(tokens=3.0, updated_at=0.0)
    assert bucket.cap(LIMITS, 0.0, remaining=1).tokens == pytest.approx(1.0)
    assert bucket.cap(LIMITS, 0.0, remaining=0).take(LIMITS, 0.0)[0] == pytest.approx(1.0)
    assert bucket.cap(LIMITS, 0.0, remaining=50).tokens == pytest.approx(3.0)
    promised = Bucket(tokens=-2.0, updated_at=0.0)
    assert promised.cap(LIMITS, 0.0, remaining=0) == promised  # turns promised stay promised


# --- in the database -----------------------------------------------------------------------------


def _accepted_by(times: list[float], limits: Limits) -> list[float]:
    """Replay the turns' ``times`` (each create starts at or after its turn: asserted by the
    callers) through a bucket of ``limits``, written out here independently of the
    code under test; returns the tokens left just before each create (< 1: refused)."""
    rate = limits.per_minute / 60.0  # the provider's own rate, without our margin
    tokens, last, seen = float(limits.burst), None, []
    for t in sorted(times):
        if last is not None:
            tokens = min(float(limits.burst), tokens + (t - last) * rate)
        last = t
        seen.append(tokens)
        tokens -= 1.0
    return seen


@pytest.fixture
def app_url(any_db_url: str) -> str:
    db.upgrade(any_db_url)
    return any_db_url


def test_racing_threads_never_create_faster_than_the_bucket(app_url: str) -> None:
    limits = Limits(per_minute=1200, burst=4)  # 20 a second
    throttle = CreateThrottle(make_engine(app_url), limits)
    created: list[float] = []  # the turns' times
    early: list[float] = []  # how long before its turn each wait ended (never > 0)
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def worker() -> None:
        barrier.wait()
        for _ in range(4):
            turn = throttle.wait_turn()
            now = time.time()
            with lock:
                created.append(turn.at)
                early.append(turn.at - now)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(created) == 48
    assert max(early) <= 0
    assert min(_accepted_by(created, limits)) >= 1.0 - 1e-6
    # ...and they are not slower than the pace either: 44 turns after the burst at 19.4/s.
    span = max(created) - min(created)
    assert span == pytest.approx((48 - limits.burst) / limits.rate_s, rel=0.25)


def _process_worker(url: str, turns: int, start_at: float, out: Any) -> None:
    throttle = CreateThrottle(make_engine(url), Limits(per_minute=1200, burst=2))
    time.sleep(max(0.0, start_at - time.time()))
    stamps = []
    for _ in range(turns):
        turn = throttle.wait_turn()
        assert time.time() >= turn.at
        stamps.append(turn.at)
    dispose_engines()
    out.put(stamps)


def test_racing_processes_share_one_bucket(app_url: str) -> None:
    """Four processes with their own engines (as runs on several hosts) pace as one."""
    limits = Limits(per_minute=1200, burst=2)
    CreateThrottle(make_engine(app_url), limits).bucket()  # the row exists before the race
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 4.0  # after every interpreter has started
    procs = [
        context.Process(target=_process_worker, args=(app_url, 8, start_at, out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    created = [t for _ in procs for t in out.get(timeout=90)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(created) == 32
    assert min(_accepted_by(created, limits)) >= 1.0 - 1e-6


def test_a_turn_past_the_deadline_is_refused_and_not_promised(app_url: str) -> None:
    limits = Limits(per_minute=60 / PACE, burst=1)
    throttle = CreateThrottle(make_engine(app_url), limits)
    # The one token, free at once: taken even past the deadline (it bounds waiting only).
    assert throttle.take(deadline=time.time() - 60) is not None
    before = throttle.bucket()
    assert throttle.take(deadline=time.time() + 0.2) is None  # the next one is a second away
    assert throttle.bucket() == before
    with pytest.raises(GenerationError) as raised:
        throttle.wait_turn(deadline=time.time() + 0.2)
    assert raised.value.code == errors.DEADLINE_EXCEEDED
    assert not raised.value.retryable


def test_a_429_holds_back_a_create_whose_turn_was_promised_before_it(app_url: str) -> None:
    limits = Limits(per_minute=600 / PACE, burst=1)  # a turn every 0.1 s
    throttle = CreateThrottle(make_engine(app_url), limits)
    throttle.wait_turn()  # the burst
    waited: list[float] = []

    def waiter() -> None:
        start = time.time()
        throttle.wait_turn()  # promised 0.1 s from now, then voided by the block
        waited.append(time.time() - start)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.02)
    throttle.observe(429, {"retry-after": "1", "ratelimit-remaining": "0"})
    thread.join(10)
    assert waited and waited[0] >= 0.95
    assert throttle.bucket().blocked_until is not None


def test_the_remaining_count_of_an_answer_empties_a_bucket_the_provider_has_emptied(
    app_url: str,
) -> None:
    limits = Limits(per_minute=600 / PACE, burst=50)
    throttle = CreateThrottle(make_engine(app_url), limits)
    throttle.observe(201, {"ratelimit-remaining": "0", "ratelimit-reset": "60"})
    start = time.time()
    throttle.wait_turn()
    assert time.time() - start >= 0.09  # the next token, not the configured burst
    throttle.observe(201, {"ratelimit-remaining": "not a number"})  # ignored


def test_a_stopped_step_stops_waiting(app_url: str) -> None:
    throttle = CreateThrottle(make_engine(app_url), Limits(per_minute=1, burst=1))
    throttle.wait_turn()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        throttle.wait_turn(stop=stop)


def test_a_turn_given_back_goes_to_the_next_taker_unless_a_block_voided_it() -> None:
    bucket = Bucket.full(LIMITS, now=0.0)
    for _ in range(4):
        _, bucket = bucket.take(LIMITS, now=0.0)  # the burst of three, and one promised
    assert bucket.given_back(LIMITS, 0.0).take(LIMITS, 0.0)[0] == pytest.approx(1.0 + ARRIVAL_S)
    assert Bucket(tokens=3.0, updated_at=0.0).given_back(LIMITS, 0.0).tokens == 3.0  # the burst


def test_a_stopped_wait_gives_its_promised_turn_back(app_url: str) -> None:
    """Regression: a wait stopped before its turn (run terminated, a sibling's error stopping
    the step) left its promised token taken, and every later create waited behind it."""
    limits = Limits(per_minute=60 / PACE, burst=1)  # a token a second
    throttle = CreateThrottle(make_engine(app_url), limits)
    throttle.wait_turn()  # the burst
    stop = threading.Event()
    outcome: list[BaseException] = []

    def stopped() -> None:
        try:
            throttle.wait_turn(stop=stop)  # promised a second from now
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=stopped)
    waiter.start()
    time.sleep(0.2)
    stop.set()
    waiter.join(5)
    assert outcome and isinstance(outcome[0], Interrupted)
    assert throttle.bucket().tokens > -0.5  # the promise is back (it was -1)
    started = time.time()
    turn = throttle.wait_turn()
    # The turn the stopped wait had, not the one behind it (about 2 s after the burst).
    assert turn.at - started < 1.0


def test_a_wait_ended_by_the_runs_interruption_gives_its_turn_back(app_url: str) -> None:
    """Dagster interrupts a run's main thread inside its sleep: that exit returns the turn
    too; a turn a 429 has voided since is not returned (the block took it back already)."""
    limits = Limits(per_minute=60 / PACE, burst=1)
    throttle = CreateThrottle(make_engine(app_url), limits)
    throttle.wait_turn()
    after_burst = throttle.bucket().tokens

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        throttle.wait_turn(sleep=interrupted)
    assert throttle.bucket().tokens == pytest.approx(after_burst, abs=0.05)

    turn = throttle.take()
    assert turn is not None
    throttle.observe(429, {"retry-after": "5"})
    blocked = throttle.bucket()
    assert throttle.give_back(turn) is False
    assert throttle.bucket() == blocked
