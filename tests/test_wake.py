"""Waking the request sensor (``runtime/wake.py``) and hearing notifications (``db/notify.py``).

- ``Wakes.sensor_due``: a wake-up after the last tick began makes the sensor due, not one
  before it, nor one within ``MIN_GAP_S`` of the tick;
- a woken loop passes at most once every ``MIN_GAP_S`` however fast wake-ups come, and its
  shutdown still ends it;
- PostgreSQL: migration 0012's trigger notifies ``generations_pending`` when a row is inserted
  pending or requeued, not when it moves on; the listener hears it, and after its connection is
  killed it reconnects and reports that it may have missed some (``None``);
- SQLite: the poller wakes for a new pending row and for a requeue, not while nothing changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from ai_handler_dagster import db
from ai_handler_dagster.db.engine import make_engine
from ai_handler_dagster.db.notify import Listener
from ai_handler_dagster.runtime import wake
from tests.support.stack import wait_for


def wait_until(check: Callable[[], bool], *, what: str, timeout_s: float = 10.0) -> None:
    wait_for(check, timeout_s=timeout_s, what=what, interval_s=0.02)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_wake_up_after_the_last_tick_began_makes_the_sensor_due() -> None:
    clock = Clock()
    wakes = wake.Wakes(clock)
    quiet = wake.QUIET_CURSOR
    assert not wakes.sensor_due(0.5, quiet)  # never woken
    wakes.wake_sensor()  # at 1000.0
    clock.now = 1000.5
    assert wakes.sensor_due(0.6, quiet)  # the last tick began at 999.9, before the wake-up
    assert wakes.sensor_due(0.6, None)  # a sensor that set no cursor yet counts as quiet
    assert not wakes.sensor_due(0.6, wake.BUSY_CURSOR)  # under load it keeps its interval
    assert not wakes.sensor_due(0.4, quiet)  # it began at 1000.1, after the wake-up: saw it
    assert not wakes.sensor_due(None, quiet)  # never ticked: Dagster decides
    wakes.wake_sensor()  # at 1000.5
    assert not wakes.sensor_due(wake.MIN_GAP_S / 2, quiet)  # too soon after the last tick


def test_a_woken_loop_passes_at_most_once_per_gap_and_still_shuts_down() -> None:
    shutdown, woken = threading.Event(), threading.Event()
    loop_event = wake._WakeOrShutdown(shutdown, woken)
    stop = threading.Event()

    def keep_waking() -> None:
        while not stop.is_set():
            woken.set()
            time.sleep(0.001)

    waker = threading.Thread(target=keep_waking)
    waker.start()
    try:
        started = time.monotonic()
        passes = 0
        while time.monotonic() - started < 1.0:
            assert loop_event.wait(5) is False
            passes += 1
    finally:
        stop.set()
        waker.join()
    # At most one pass per gap; at least a few even on a busy machine.
    assert 3 <= passes <= 1 / wake.MIN_GAP_S + 2
    # Dagster's controller sets its own event: a long wait still ends at once.
    threading.Timer(0.05, shutdown.set).start()
    started = time.monotonic()
    assert loop_event.wait(30) is True
    assert time.monotonic() - started < 5
    assert loop_event.is_set()


class FakeQueueDaemon:
    """What queue_passes uses of Dagster's run-queue daemon."""

    interval_seconds = 5.0

    def __init__(self) -> None:
        self.passes: list[float] = []
        self._logger = logging.getLogger("fake-queue-daemon")

    def run_iteration(self, _context: object) -> Iterator[None]:
        self.passes.append(time.monotonic())
        yield None


def test_the_run_queue_reads_again_when_a_run_is_queued_not_only_at_its_interval() -> None:
    daemon, shutdown, woken = FakeQueueDaemon(), threading.Event(), threading.Event()
    loop = wake.queue_passes(
        daemon, None, shutdown, woken, markers=("start", "end"), error_info=lambda: "error"
    )

    def drive() -> None:
        for _ in loop:
            if shutdown.is_set():
                return

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        wait_until(lambda: len(daemon.passes) == 1, what="the first pass")
        time.sleep(0.3)
        assert len(daemon.passes) == 1  # its interval is 5 s: nothing else reads
        woken.set()
        wait_until(lambda: len(daemon.passes) == 2, what="a pass for the queued run")
        assert daemon.passes[1] - daemon.passes[0] < 2
        # Wake-ups faster than the gap: passes stay at least MIN_GAP_S apart.
        for _ in range(30):
            woken.set()
            time.sleep(0.01)
        wait_until(lambda: len(daemon.passes) >= 3, what="a pass for the burst")
        gaps = [b - a for a, b in zip(daemon.passes, daemon.passes[1:], strict=False)]
        assert min(gaps) >= wake.MIN_GAP_S * 0.9
        assert len(daemon.passes) <= 6
    finally:
        shutdown.set()
        driver.join(10)
    assert not driver.is_alive()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    db.upgrade(pg_url)
    engine = make_engine(pg_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _insert(engine: sa.Engine, status: str = "pending") -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.text(
                    "INSERT INTO generations (user_id, model, input, status) "
                    "VALUES ('u', 'demo/pixel-sketch', '{}', :status) RETURNING id"
                ),
                {"status": status},
            ).scalar_one()
        )


def _set_status(engine: sa.Engine, generation_id: int, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE generations SET status = :s WHERE id = :id"),
            {"s": status, "id": generation_id},
        )


@pytest.mark.postgres
def test_the_trigger_announces_pending_rows_and_the_listener_reconnects(
    pg_engine: sa.Engine,
) -> None:
    heard: list[list[str] | None] = []
    listener = Listener(pg_engine, wake.CHANNEL, heard.append)
    listener.start()
    try:
        assert listener.wait_listening(10)
        wait_until(lambda: heard == [None], what="the first (re)connection report")
        heard.clear()

        generation_id = _insert(pg_engine)
        wait_until(lambda: heard == [[""]], what="the insert's notification")
        _set_status(pg_engine, generation_id, "queued")
        _set_status(pg_engine, generation_id, "pending")  # a requeue
        wait_until(lambda: len(heard) == 2, what="the requeue's notification")
        assert heard == [[""], [""]]  # moving on to queued announced nothing
        # A batch in one transaction is one notification.
        with pg_engine.begin() as conn:
            for _ in range(3):
                conn.execute(
                    sa.text(
                        "INSERT INTO generations (user_id, model, input) "
                        "VALUES ('u', 'demo/pixel-sketch', '{}')"
                    )
                )
        wait_until(lambda: len(heard) == 3, what="the batch's notification")
        time.sleep(0.3)
        assert heard == [[""], [""], [""]]

        heard.clear()
        with pg_engine.begin() as conn:
            killed = (
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query = 'LISTEN generations_pending' "
                        "AND datname = current_database()"
                    )
                )
                .scalars()
                .all()
            )
        assert killed == [True]
        wait_until(lambda: None in heard, what="the listener's reconnection", timeout_s=15)
        assert listener.wait_listening(10)
        heard.clear()
        _insert(pg_engine)
        wait_until(lambda: heard == [[""]], what="a notification after reconnecting")
    finally:
        listener.stop()


def test_the_sqlite_poller_wakes_for_new_and_requeued_rows(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    wakes: list[float] = []
    watcher = wake.PendingWatcher(engine, lambda: wakes.append(time.monotonic()), poll_ms=20)
    watcher.start()
    try:
        time.sleep(0.2)
        assert wakes == []  # nothing pending
        generation_id = _insert(engine)
        wait_until(lambda: len(wakes) == 1, what="a wake-up for the new row")
        time.sleep(0.2)
        assert len(wakes) == 1  # the same pending row wakes once
        # A second row inserted within the same second: its pending_since (to the second, by
        # SQLite's default) may equal the first's; its id is new.
        _insert(engine)
        wait_until(lambda: len(wakes) == 2, what="a wake-up for the second row")
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE generations SET status = 'queued'"))
        time.sleep(0.2)
        assert len(wakes) == 2  # nothing pending: claims wake nothing
        with engine.begin() as conn:  # a requeue sets pending_since again
            conn.execute(
                sa.text(
                    "UPDATE generations SET status = 'pending', "
                    "pending_since = datetime('now', '+1 second') WHERE id = :id"
                ),
                {"id": generation_id},
            )
        wait_until(lambda: len(wakes) == 3, what="a wake-up for the requeue")
    finally:
        watcher.stop()
        engine.dispose()
