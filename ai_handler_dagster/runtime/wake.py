"""Waking the request sensor when a request becomes pending, and the run queue when a run is
queued, so an idle system starts a request at once instead of at the next tick and poll.

Without this a request waits for the request sensor's next tick (every second: 0.5 s on
average, plus the loop's slack) and then for the run queue's next read (every 0.5 s). The
daemon process (``runtime/daemon.py``) installs three things:

- a watcher of pending requests in a thread: on PostgreSQL it listens on
  ``generations_pending``, which a trigger (migration 0012) notifies when a row is inserted or
  updated with status ``pending`` (a submit through the API or the CLI, an application's own
  ``INSERT``, a requeue); on SQLite, which cannot notify, it reads the newest row's id and the
  newest pending row's ``pending_since`` every ``AI_HANDLER_SENSOR_WAKE_POLL_MS`` (two index
  seeks) and wakes when either moved while a row is pending;
- the sensor daemon's loop sleeps until a wake-up (or its period), and the request sensor is
  due when a wake-up came after its last tick began, at least ``MIN_GAP_S`` after it, and
  that tick was quiet: it found at most ``AI_HANDLER_SMALL_BACKLOG`` generations pending,
  queued or running (the sensor's cursor, ``QUIET_CURSOR``). Under load the sensor keeps its
  own interval, so a tick still batches what arrived meanwhile instead of launching a run per
  request, and requests that arrive together do not wake it for nothing;
- the run queue's loop sleeps until a run is queued in this process (the sensor daemon's
  submissions, run retries) or its period.

The sensor stays the only claimer of pending rows: a wake-up only moves its next tick earlier.
So nothing about claiming changes (``FOR UPDATE SKIP LOCKED``, run keys, the relaunch of a
tick that crashed), a lost or extra wake-up costs at most a tick's wait or one skipped tick,
and the service needs no Dagster at all. ``AI_HANDLER_SENSOR_WAKE=0`` turns it off (the
benchmark measures both).

Everything here reaches into Dagster's daemon internals; when an upgrade removes one of the
names it patches, ``install`` says so on stderr and patches nothing (the loops run as Dagster
ships them). It checks names, not signatures: ``tests/test_wake.py`` drives the patched loops.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

#: The sensor woken up: its name in the code location.
REQUEST_SENSOR = "generation_request_sensor"
#: The channel of migration 0012.
CHANNEL = "generations_pending"
#: A woken tick comes at least this long after the previous tick began.
MIN_GAP_S = 0.1
#: The request sensor's cursor after a tick that found at most ``AI_HANDLER_SMALL_BACKLOG``
#: generations pending, queued or running (``QUIET``), or more (``BUSY``). A wake-up moves only
#: the tick after a quiet one earlier: under load the sensor keeps its own interval, so each
#: tick batches what arrived meanwhile instead of launching a run per request.
QUIET_CURSOR = "quiet"
BUSY_CURSOR = "busy"
#: Slices in which a woken wait still sees its daemon's shutdown.
_SLICE_S = 0.05


class Wakes:
    """The wake-ups of one daemon process: set from any thread, consumed by the loops."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.sensor = threading.Event()
        self.queue = threading.Event()
        #: When the last wake-up of the sensor came (wall clock, as Dagster's tick times).
        self.sensor_woken_at = 0.0

    def wake_sensor(self) -> None:
        self.sensor_woken_at = self._clock()
        self.sensor.set()

    def wake_queue(self) -> None:
        self.queue.set()

    def sensor_due(self, elapsed: float | None, cursor: str | None) -> bool:
        """Whether the request sensor, whose last tick began ``elapsed`` seconds ago and left
        ``cursor``, should tick now for a wake-up (None: it never ticked; Dagster decides)."""
        if elapsed is None or elapsed < MIN_GAP_S or cursor == BUSY_CURSOR:
            return False
        return self.sensor_woken_at > self._clock() - elapsed


class _WakeOrShutdown(threading.Event):
    """Stands for a daemon's shutdown event in its loop: ``wait`` also ends at a wake-up, but
    at most once every ``MIN_GAP_S`` however fast wake-ups come."""

    def __init__(self, shutdown: threading.Event, wake: threading.Event) -> None:
        super().__init__()
        self._shutdown = shutdown
        self._wake = wake
        self._last = 0.0

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._shutdown.is_set():
            left = _SLICE_S if deadline is None else min(_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                break
            if self._wake.wait(left):
                self._wake.clear()
                rest = MIN_GAP_S - (time.monotonic() - self._last)
                if rest > 0:
                    self._shutdown.wait(rest)
                break
        self._last = time.monotonic()
        return self._shutdown.is_set()

    def is_set(self) -> bool:
        return self._shutdown.is_set()

    def set(self) -> None:
        self._shutdown.set()
        self._wake.set()

    def clear(self) -> None:
        self._shutdown.clear()


# --- Watching for pending requests ---------------------------------------------------------------


class PendingWatcher:
    """Calls ``wake`` when a request may have become pending in the app database."""

    def __init__(self, engine: sa.Engine, wake: Callable[[], None], *, poll_ms: int) -> None:
        from ai_handler_dagster.db.engine import is_sqlite
        from ai_handler_dagster.db.notify import Listener

        self._engine = engine
        self._wake = wake
        self._poll_s = poll_ms / 1000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        if not is_sqlite(engine):
            self._listener = Listener(engine, CHANNEL, lambda _payloads: wake())

    def start(self) -> None:
        if self._listener is not None:
            self._listener.start()
            return
        self._thread = threading.Thread(target=self._poll, name="pending-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
        if self._thread is not None:
            self._thread.join(5)

    def wait_listening(self, timeout: float) -> bool:
        """True once the watcher hears new requests (PostgreSQL: listens; SQLite: at once)."""
        return self._listener is None or self._listener.wait_listening(timeout)

    def _poll(self) -> None:
        connection: Any = None
        version = None
        last: tuple[Any, ...] | None = None
        failing = False
        while not self._stop.wait(self._poll_s):
            try:
                if connection is None:
                    connection = self._connect()
                # Changes when another connection commits; reading it takes no lock.
                now_version = connection.execute("PRAGMA data_version").fetchone()[0]
                if now_version == version:
                    continue
                seen = tuple(connection.execute(_NEWEST_SQL).fetchone())
                version = now_version
            except Exception:
                if not failing:  # once per outage, not at every poll
                    log.warning("pending-request poller cannot read; retrying", exc_info=True)
                failing = True
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()
                connection = None
                continue
            failing = False
            if seen[2] and seen != last:
                self._wake()
            last = seen
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _connect(self) -> Any:
        # The engine's own connections begin every transaction with BEGIN IMMEDIATE (the write
        # lock); this one reads in autocommit, a snapshot per statement, and never writes.
        pooled = self._engine.raw_connection()
        connection: Any = pooled.driver_connection
        pooled.detach()
        connection.isolation_level = None
        return connection


#: The newest row's id (a new row: an application's INSERT stamps ``pending_since`` to the
#: second only), the newest pending row's ``pending_since`` (a requeue) and the pending rows
#: counted up to 1000: index seeks on the primary key and ix_generations_status_pending_since_id.
_NEWEST_SQL = """
SELECT (SELECT max(id) FROM generations),
       (SELECT max(pending_since) FROM generations WHERE status = 'pending'),
       (SELECT count(*) FROM (SELECT 1 FROM generations WHERE status = 'pending' LIMIT 1000))
"""


# --- Into Dagster's daemon -------------------------------------------------------------------


def install(wakes: Wakes) -> bool:
    """Make the sensor and run-queue loops of this process wake up on ``wakes``. False (and a
    line on stderr) when this Dagster has moved what it needs; its loops then run as shipped."""
    try:
        import dagster._daemon.sensor as sensor_daemon
        from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
        from dagster._daemon.daemon import SensorDaemon, SpanMarker
        from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
            QueuedRunCoordinatorDaemon,
        )
        from dagster._utils.error import serializable_error_info_from_exc_info

        is_under_min_interval = sensor_daemon.is_under_min_interval
        get_elapsed = sensor_daemon.get_elapsed
        sensor_core_loop = SensorDaemon.core_loop
        submit_run = QueuedRunCoordinator.submit_run
        QueuedRunCoordinatorDaemon.run_iteration  # noqa: B018 - what queue_passes calls
    except (ImportError, AttributeError) as exc:
        sys.stderr.write(f"ai_handler_dagster.runtime.wake: loops not wakeable here: {exc}\n")
        return False

    def under_min_interval(state: Any, remote_sensor: Any, *args: Any, **kwargs: Any) -> bool:
        if remote_sensor.name == REQUEST_SENSOR:
            data = state.instigator_data
            if wakes.sensor_due(get_elapsed(state), getattr(data, "cursor", None)):
                return False
        return is_under_min_interval(state, remote_sensor, *args, **kwargs)

    def sensor_loop(self: Any, workspace_process_context: Any, shutdown_event: Any) -> Any:
        return sensor_core_loop(
            self, workspace_process_context, _WakeOrShutdown(shutdown_event, wakes.sensor)
        )

    def submit_and_wake(self: Any, context: Any) -> Any:
        run = submit_run(self, context)
        wakes.wake_queue()
        return run

    def queue_loop(self: Any, workspace_process_context: Any, shutdown_event: Any) -> Any:
        return queue_passes(
            self,
            workspace_process_context,
            shutdown_event,
            wakes.queue,
            markers=(SpanMarker.START_SPAN, SpanMarker.END_SPAN),
            error_info=lambda: serializable_error_info_from_exc_info(sys.exc_info()),
        )

    sensor_daemon.is_under_min_interval = under_min_interval  # type: ignore[assignment]
    SensorDaemon.core_loop = sensor_loop  # type: ignore[method-assign]
    QueuedRunCoordinator.submit_run = submit_and_wake  # type: ignore[method-assign]
    QueuedRunCoordinatorDaemon.core_loop = queue_loop  # type: ignore[method-assign]
    return True


def queue_passes(
    daemon: Any,
    workspace_process_context: Any,
    shutdown_event: threading.Event,
    wake: threading.Event,
    *,
    markers: tuple[Any, Any],
    error_info: Callable[[], Any],
) -> Any:
    """The run queue daemon's loop (Dagster's ``IntervalDaemon.core_loop``, without its
    jitter, which it does not use), whose sleep also ends when ``wake`` is set, at most once
    every ``MIN_GAP_S``."""
    start, end = markers
    while True:
        started = time.monotonic()
        yield start
        try:
            yield from daemon.run_iteration(workspace_process_context)
        except Exception:
            info = error_info()
            daemon._logger.error("Caught error:\n%s", info)
            yield info
        yield end
        while not shutdown_event.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= daemon.interval_seconds:
                break
            if wake.is_set() and elapsed >= MIN_GAP_S:
                wake.clear()
                break
            if wake.is_set():
                shutdown_event.wait(MIN_GAP_S - elapsed)
            else:
                wake.wait(min(daemon.interval_seconds - elapsed, 0.5))
            yield None
        yield None
