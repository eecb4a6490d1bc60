"""Hearing PostgreSQL notifications (``LISTEN``) in a thread.

One ``Listener`` holds one connection of its own (taken from the engine's pool and detached from
it) and hands the payloads of each batch of notifications to a callback, on its thread. When the
connection breaks it reconnects; since notifications sent while nobody listened are lost, the
callback gets ``None`` after each (re)connection, meaning "anything may have happened".

Used by the API's event streams (``api/streams.py``, channel ``generation_events``) and by the
daemon's wake-ups (``runtime/wake.py``, channel ``generations_pending``). SQLite cannot notify;
both poll there instead.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

#: Reconnection backoff: 1 s, doubling up to 30 s while the database stays unreachable.
_RECONNECT_S = 1.0
_RECONNECT_MAX_S = 30.0
#: A listening connection idle this long is checked with ``SELECT 1``: a connection the
#: network dropped silently never becomes readable and would leave the listener deaf.
_CHECK_IDLE_S = 30.0

#: Receives the payloads of the notifications heard together, or None after a (re)connection.
OnNotify = Callable[[list[str] | None], None]


class Listener:
    """``LISTEN channel`` on a connection of its own, in a daemon thread."""

    def __init__(self, engine: sa.Engine, channel: str, on_notify: OnNotify) -> None:
        if not channel.isidentifier():
            raise ValueError(f"not a channel name: {channel!r}")
        self._engine = engine
        self._channel = channel
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"listen-{self._channel}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; returns once the thread ended (or after ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_listening(self, timeout: float) -> bool:
        """True once the connection listens (tests wait for it before they write)."""
        return self._listening.wait(timeout)

    def _run(self) -> None:
        backoff = _RECONNECT_S
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception:
                # A traceback for the first failure of an outage, one line for each retry.
                log.warning(
                    "listener of %s lost its connection; reconnecting in %.0f s",
                    self._channel,
                    backoff,
                    exc_info=backoff == _RECONNECT_S,
                )
            was_listening = self._listening.is_set()
            self._listening.clear()
            if was_listening:
                backoff = _RECONNECT_S  # it worked until now: a new outage starts
            self._stop.wait(backoff)
            if not was_listening:
                backoff = min(backoff * 2, _RECONNECT_MAX_S)

    def _listen_once(self) -> None:
        pooled = self._engine.raw_connection()
        connection: Any = pooled.driver_connection
        pooled.detach()  # this connection is ours alone, for as long as it lives
        try:
            connection.autocommit = True
            cursor = connection.cursor()
            cursor.execute(f"LISTEN {self._channel}")
            cursor.close()
            self._listening.set()
            # Whatever committed before LISTEN took effect was not heard.
            self._on_notify(None)
            drain = _psycopg2_drain if hasattr(connection, "poll") else _psycopg_drain
            heard = time.monotonic()
            while not self._stop.is_set():
                readable, _, _ = select.select([connection], [], [], 1.0)
                if readable:
                    heard = time.monotonic()
                    payloads = drain(connection)
                    if payloads:
                        self._on_notify(payloads)
                elif time.monotonic() - heard > _CHECK_IDLE_S:
                    check = connection.cursor()
                    check.execute("SELECT 1")  # raises on a closed connection: reconnect
                    check.close()
                    heard = time.monotonic()
                    # Notifications that came with its answer were read off the socket.
                    payloads = drain(connection)
                    if payloads:
                        self._on_notify(payloads)
        finally:
            with contextlib.suppress(Exception):
                connection.close()


def _psycopg2_drain(connection: Any) -> list[str]:
    connection.poll()
    notifies = connection.notifies
    payloads = [n.payload for n in notifies]
    notifies.clear()
    return payloads


def _psycopg_drain(connection: Any) -> list[str]:
    # psycopg 3: the notifications already received, without waiting for more.
    return [n.payload for n in connection.notifies(timeout=0)]
