"""Waking the event streams of one API worker when their generations get new events.

Each worker has one ``Hub``. A stream subscribes to its generation and sleeps until the hub
wakes it; then it reads the events after the last one it sent. What wakes the hub:

- PostgreSQL: one connection per worker (``db/notify.py``, in a thread) listens on
  ``generation_events``; a trigger (migration 0011) notifies the generation's id when each
  event commits, whoever wrote it. Streams never poll the table: an idle stream costs a
  coroutine and a keep-alive comment. When the listening connection breaks, the listener
  reconnects and the hub wakes every stream once, since notifications sent meanwhile are lost
  (the streams read and catch up).
- SQLite, which cannot notify: one poller per worker reads the ids of the generations that got
  events since its last look, every ``AI_HANDLER_API_EVENTS_POLL_MS``, and only while a stream
  is open. Its cost does not grow with the number of streams.

Shutting down: uvicorn closes no connection while a response is under way, and runs the app's
lifespan shutdown (which closes the hub) only once every connection is closed, so an open stream
would hold the worker until its client left. ``end_streams`` ends them: each stream wakes, sees
``ending`` and returns, which ends its response cleanly (the client reconnects with
``Last-Event-ID``, elsewhere). The server calls it when it starts shutting its connections
(``server.HeadDeadline.shutdown``, through the lifespan state, ``server.ON_SHUTDOWN``);
``close`` calls it too, for a lifespan that ends while streams are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator

import sqlalchemy as sa

from ai_handler_dagster.db.engine import is_sqlite
from ai_handler_dagster.db.models import GenerationEvent
from ai_handler_dagster.db.notify import Listener

log = logging.getLogger(__name__)

CHANNEL = "generation_events"


class Hub:
    """The worker's subscriptions: a generation id to the wake-up events of its streams."""

    def __init__(self, engine: sa.Engine, *, poll_ms: int) -> None:
        self._engine = engine
        self._poll_s = poll_ms / 1000
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._poller: asyncio.Task[None] | None = None
        self._ending = False

    @property
    def streams(self) -> int:
        """Streams open on this worker."""
        return sum(len(w) for w in self._waiters.values())

    @property
    def ending(self) -> bool:
        """True once the worker is shutting down: a stream that sees it ends."""
        return self._ending

    def end_streams(self) -> None:
        """End every open stream, and any opened later after its first events (on the loop's
        thread; calling it again does nothing more)."""
        if not self._ending:
            self._ending = True
            self._wake(None)

    def start(self) -> None:
        """Start listening (PostgreSQL) or polling (SQLite); call it on the worker's loop."""
        self._loop = asyncio.get_running_loop()
        if is_sqlite(self._engine):
            self._poller = self._loop.create_task(self._poll(), name="event-poller")
        else:
            self._listener = Listener(self._engine, CHANNEL, self._heard)
            self._listener.start()

    async def close(self) -> None:
        """End the open streams (if the server has not), then stop listening or polling."""
        self.end_streams()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)

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
        return self._listener is None or self._listener.wait_listening(timeout)

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

    def _heard(self, payloads: list[str] | None) -> None:
        # On the listener's thread: None (a reconnection) wakes every stream, since
        # notifications sent meanwhile are lost.
        self._from_thread(None if payloads is None else _generation_ids(payloads))

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
