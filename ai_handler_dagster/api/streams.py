"""Waking the event streams of one API worker when their generations get new events.

Each worker has one ``Hub``. A stream subscribes to its generation and sleeps until the hub
wakes it; then it reads the events after the last one it sent. What wakes the hub:

- PostgreSQL: one connection per worker, in a thread, ``LISTEN``\\ s on ``generation_events``; a
  trigger (migration 0011) notifies the generation's id when each event commits, whoever wrote
  it. Streams never poll the table: an idle stream costs a coroutine and a keep-alive comment.
  When the listening connection breaks, the thread reconnects and wakes every stream once,
  since notifications sent meanwhile are lost (the streams read and catch up).
- SQLite, which cannot notify: one poller per worker reads the ids of the generations that got
  events since its last look, every ``AI_HANDLER_API_EVENTS_POLL_MS``, and only while a stream
  is open. Its cost does not grow with the number of streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import GenerationEvent

log = logging.getLogger(__name__)

CHANNEL = "generation_events"
_RECONNECT_S = 1.0


class Hub:
    """The worker's subscriptions: a generation id to the wake-up events of its streams."""

    def __init__(self, engine: sa.Engine, *, poll_ms: int) -> None:
        self._engine = engine
        self._poll_s = poll_ms / 1000
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: asyncio.Task[None] | None = None
        self._listening = threading.Event()

    @property
    def streams(self) -> int:
        """Streams open on this worker."""
        return sum(len(w) for w in self._waiters.values())

    def start(self) -> None:
        """Start listening (PostgreSQL) or polling (SQLite); call it on the worker's loop."""
        self._loop = asyncio.get_running_loop()
        if is_sqlite(self._engine):
            self._poller = self._loop.create_task(self._poll(), name="event-poller")
        else:
            self._thread = threading.Thread(target=self._listen, name="event-listener", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        self._wake(None)

    @contextlib.contextmanager
    def subscribe(self, generation_id: int) -> Iterator[asyncio.Event]:
        """An event set whenever the generation may have new events, until the block ends."""
        woken = asyncio.Event()
        self._waiters.setdefault(generation_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiters.get(generation_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[generation_id]

    def wait_listening(self, timeout: float) -> bool:
        """True once the PostgreSQL listener is listening (tests use it; SQLite: at once)."""
        return self._thread is None or self._listening.wait(timeout)

    def _wake(self, generation_ids: Iterable[int] | None) -> None:
        """Wake the streams of these generations (None: every stream). On the loop's thread."""
        if generation_ids is None:
            groups: Iterable[set[asyncio.Event]] = list(self._waiters.values())
        else:
            groups = [self._waiters[g] for g in set(generation_ids) if g in self._waiters]
        for group in groups:
            for woken in group:
                woken.set()

    # --- PostgreSQL ------------------------------------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception:
                log.warning("event listener lost its connection; reconnecting", exc_info=True)
            finally:
                self._listening.clear()
            self._stop.wait(_RECONNECT_S)

    def _listen_once(self) -> None:
        pooled = self._engine.raw_connection()
        connection: Any = pooled.driver_connection
        pooled.detach()  # this connection is ours alone, for as long as it lives
        try:
            connection.autocommit = True
            cursor = connection.cursor()
            cursor.execute(f"LISTEN {CHANNEL}")
            cursor.close()
            self._listening.set()
            # Whatever committed before LISTEN took effect was not heard: every stream reads.
            self._from_thread(None)
            drain = _psycopg2_drain if hasattr(connection, "poll") else _psycopg_drain
            while not self._stop.is_set():
                readable, _, _ = select.select([connection], [], [], 1.0)
                if readable:
                    woken = drain(connection)
                    if woken:
                        self._from_thread(woken)
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _from_thread(self, generation_ids: set[int] | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake, generation_ids)

    # --- SQLite ----------------------------------------------------------------------------------

    async def _poll(self) -> None:
        last = await asyncio.to_thread(self._newest)
        while True:
            await asyncio.sleep(self._poll_s)
            if not self._waiters:
                continue
            try:
                last, woken = await asyncio.to_thread(self._since, last)
            except Exception:
                log.warning("event poller failed to read; retrying", exc_info=True)
                continue
            if woken:
                self._wake(woken)

    def _newest(self) -> int:
        with self._engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.max(GenerationEvent.id))).scalar() or 0)

    def _since(self, last: int) -> tuple[int, set[int]]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(GenerationEvent.id, GenerationEvent.generation_id).where(
                    GenerationEvent.id > last
                )
            ).all()
        if not rows:
            return last, set()
        return max(r.id for r in rows), {r.generation_id for r in rows}


def _generation_ids(payloads: Iterable[str]) -> set[int]:
    found = set()
    for payload in payloads:
        with contextlib.suppress(ValueError):
            found.add(int(payload))
    return found


def _psycopg2_drain(connection: object) -> set[int]:
    connection.poll()  # type: ignore[attr-defined]
    notifies = connection.notifies  # type: ignore[attr-defined]
    payloads = [n.payload for n in notifies]
    notifies.clear()
    return _generation_ids(payloads)


def _psycopg_drain(connection: object) -> set[int]:
    # psycopg 3: the notifications already received, without waiting for more.
    received = connection.notifies(timeout=0)  # type: ignore[attr-defined]
    return _generation_ids(n.payload for n in received)
