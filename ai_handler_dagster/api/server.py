"""Running the API: :func:`serve` (``ai-handler serve``: uvicorn, one or several workers) and
:func:`start_server` (one worker in a background thread, for the embedded stack and tests).

Both bind the listening socket themselves before uvicorn starts, so port 0 picks a free port
whose number is known (and written to ``port_file``) before the first request can arrive.
Limits against slow or greedy clients: a deadline for each request head (:class:`HeadDeadline`)
and for its body (``limits.py``), at most ``LIMIT_CONCURRENCY`` connections per worker (503
beyond), a keep-alive timeout between requests, and the body size limit.

Stopping (SIGINT or SIGTERM, a worker's SIGTERM from uvicorn's supervisor, ``ServerHandle.stop``):
uvicorn stops accepting, asks every open connection to shut down and waits until each has
closed before it runs the app's lifespan shutdown. A connection closes only when its response
is complete, and an event stream completes only when its generation ends: the protocol
(:meth:`HeadDeadline.shutdown`) so calls the app's ``ON_SHUTDOWN`` hook, which ends the
worker's open streams (``streams.Hub.end_streams``). This is the one exit hook every way of
running the server goes through: uvicorn's own signal handlers are not installed in a thread,
and its supervisor's workers are plain ``uvicorn.Server`` instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from ai_handler_dagster import settings

log = logging.getLogger(__name__)

#: The factory uvicorn calls in each worker.
APP_FACTORY = "ai_handler_dagster.api.app:create_app"
#: Connections one worker serves at once; more are answered 503.
LIMIT_CONCURRENCY = 1000
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 5
#: Bytes of a request head buffered before the connection is closed.
MAX_HEAD_BYTES = 64 * 1024
#: The environment variable prometheus-client's multiprocess mode reads.
METRICS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
#: The key of the app's lifespan state under which it leaves a callable the server calls (on the
#: worker's loop) when it starts shutting its connections down: what ends long responses.
ON_SHUTDOWN = "ai_handler.on_shutdown"


class HeadDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for each request head.

    uvicorn times out an idle keep-alive connection only after a response, so a client that
    connects and sends its head a byte at a time (or never) holds a connection for ever, and a
    thousand of them take every connection a worker allows (``LIMIT_CONCURRENCY``). Here a
    connection whose request head is not complete ``AI_HANDLER_API_BODY_TIMEOUT_S`` after it
    opened, or after the request's first byte, is closed; the body's own deadline is
    ``limits.BodyLimits``'. A head growing past ``MAX_HEAD_BYTES`` is not buffered further: the
    connection is closed.

    When the server shuts a connection down, it also calls the app's ``ON_SHUTDOWN`` hook (once
    per connection; the hook ends the worker's event streams, which would otherwise keep their
    connections, and so the server, open until their clients leave).
    """

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(settings.api_body_timeout_s(), self._late)

    def _disarm(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            # Bytes already received without a complete head (one read is bounded by the
            # transport): past the limit the connection is closed, nothing more is buffered.
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("closed a connection whose request head is over %d bytes", MAX_HEAD_BYTES)
                self._disarm()
                self.transport.close()
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def _late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("closed a connection whose request head did not arrive in time")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()
        # app_state is the lifespan state: the same dict for every connection of the server.
        on_shutdown = self.app_state.get(ON_SHUTDOWN)
        if on_shutdown is not None:
            on_shutdown()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def display_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket, as a client on this host reaches it."""
    host, port = sock.getsockname()[:2]
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _config(app: str | FastAPI, *, workers: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        http=HeadDeadline,
        workers=workers,
        log_level=log_level.lower(),
        access_log=False,
        limit_concurrency=LIMIT_CONCURRENCY,
        timeout_keep_alive=KEEP_ALIVE_S,
        server_header=False,
        lifespan="on",
    )


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees half a number."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


def serve(
    host: str,
    port: int,
    *,
    workers: int = 1,
    port_file: Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API in the foreground until SIGINT or SIGTERM, with ``workers`` processes.

    With several workers, metrics are kept in prometheus-client's multiprocess directory
    (``PROMETHEUS_MULTIPROC_DIR``; a fresh temporary one unless set), so ``/metrics`` adds up
    every worker's counts.
    """
    sock = bind(host, port)
    made_dir = None
    if workers > 1 and not os.environ.get(METRICS_DIR_VAR):
        made_dir = tempfile.mkdtemp(prefix="ai-handler-metrics-")
        os.environ[METRICS_DIR_VAR] = made_dir
    try:
        if port_file is not None:
            write_port_file(port_file, sock.getsockname()[1])
        log.info("API listening on %s with %d worker(s)", display_url(sock), workers)
        config = _config(APP_FACTORY, workers=workers, log_level=log_level)
        # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again to the handler it
        # found: with these, a stop asked for by signal ends here and the command exits 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        if workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if made_dir is not None:
            import shutil

            shutil.rmtree(made_dir, ignore_errors=True)


class ServerHandle:
    """An API served in a background thread: its ``url`` and ``stop()``."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket):
        self._server = server
        self._thread = thread
        self._sock = sock
        self.url = display_url(sock)
        self.port: int = sock.getsockname()[1]

    def stop(self) -> None:
        """Stop serving (open requests finish) and release the port; safe to call twice."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.url})"


def start_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> ServerHandle:
    """Serve ``app`` on ``host:port`` in a background thread; returns once it accepts."""
    sock = bind(host, port)
    server = uvicorn.Server(_config(app, workers=1, log_level=log_level))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="api-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    return ServerHandle(server, thread, sock)
