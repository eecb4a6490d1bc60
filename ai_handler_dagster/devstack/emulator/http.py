"""The stdlib HTTP server under the Replicate emulator (a development tool: the service the
project ships, ``ai-handler serve``, runs on uvicorn).

:class:`LocalHTTPServer` is a ``ThreadingHTTPServer`` for bursts and clean stops: daemon request
threads, a deep listen queue, IPv6 when the host has a ``:``, and the open connections kept so
that :meth:`~LocalHTTPServer.close_connections` can cut the kept-alive ones after ``shutdown()``.

:class:`TrackedHandler` speaks HTTP/1.1 with keep-alive, registers its connection with the
server, logs requests at debug level and reads a request body (``Content-Length`` or chunked)
up to a limit with :meth:`~TrackedHandler.read_body`. Subclasses add the routes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ai_handler_dagster.errors import AiHandlerError

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")


class BodyTooLarge(AiHandlerError, ValueError):
    """A request body over the limit, refused before the data past the limit is read."""


class LocalHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections.

    ``lock`` guards ``connections``; subclasses may use it for their own shared counters.
    """

    daemon_threads = True
    allow_reuse_address = True
    # A burst (hundreds of creates, or of completions ending together) must queue in the
    # kernel, not be refused.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler_class: type[TrackedHandler]) -> None:
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class)

    def close_connections(self) -> None:
        """Cut keep-alive connections so a stopped server answers nothing more."""
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class TrackedHandler(BaseHTTPRequestHandler):
    """A keep-alive request handler whose connection the server can cut on stop."""

    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections are closed after this long, so they do not pin threads.
    timeout = 30
    # Head and body leave in one buffered write with Nagle off: written separately, the
    # client's delayed ACK stalls every answer by about 40 ms.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    #: Where :meth:`log_message` writes, at debug level (a subclass sets its module's logger).
    logger = logging.getLogger(__name__)
    server: LocalHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        self.logger.debug("%s " + format, self.address_string(), *args)

    def read_body(self, limit: int) -> bytes:
        """The request body, sent with ``Content-Length`` or chunked (no length: empty).

        Raises:
            BodyTooLarge: the body is over ``limit`` bytes; found from ``Content-Length`` or a
                chunk's size, before that data is read.
            ValueError: a malformed chunk size or ``Content-Length``. Either way the rest of
                the body is unread: the connection cannot carry another request.
        """
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(100).split(b";")[0].strip()
                if not _CHUNK_SIZE.fullmatch(line):
                    raise ValueError("malformed chunk size in a chunked body")
                size = int(line, 16)
                if size == 0:
                    while self.rfile.readline(1000).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise BodyTooLarge(f"body over the {limit}-byte limit")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(10)  # CRLF after each chunk
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        if not _CONTENT_LENGTH.fullmatch(raw.strip()):
            raise ValueError("invalid Content-Length")
        length = int(raw)
        if length > limit:
            raise BodyTooLarge(f"body over the {limit}-byte limit")
        return self.rfile.read(length) if length else b""
