"""A recording HTTP proxy in front of the API, for tests of client examples.

It forwards every request to the API and records what the client sent (method, path, query,
``Authorization``, ``Last-Event-ID``), so a test can check which credential reached which
route. Event streams are forwarded as they arrive; ``drop_streams`` cuts that many of the first
event streams right after their first complete event, without ending the chunked body, as a
dropped connection would, so the client has to resume.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx

#: Headers that belong to one connection, not to the request or answer.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_EVENT_ID = re.compile(rb"^id: ?(.*?)\r?$", re.MULTILINE)
_COMMENT = re.compile(rb"^:", re.MULTILINE)


@dataclass
class Seen:
    """One request the client sent, and what the proxy passed back."""

    method: str
    path: str
    query: str
    authorization: str | None
    last_event_id: str | None
    status: int = 0
    #: The ``id`` of every event forwarded to the client (event streams only).
    event_ids: list[str] = field(default_factory=list)
    #: Comment lines forwarded (the server's keep-alives).
    comments: int = 0
    dropped: bool = False
    body: bytes = b""


class RecordingProxy:
    def __init__(self, upstream: str, *, drop_streams: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[Seen] = []
        self._drops_left = drop_streams
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=120), trust_env=False)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def requests_to(self, method: str, pattern: str) -> list[Seen]:
        """The recorded requests of ``method`` whose path matches ``pattern`` entirely."""
        return [s for s in self.seen if s.method == method and re.fullmatch(pattern, s.path)]

    @contextlib.contextmanager
    def running(self) -> Iterator[RecordingProxy]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(10)
            self._client.close()

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops_left <= 0:
                return False
            self._drops_left -= 1
            return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def _forward(self) -> None:
                target = urlsplit(self.path)
                seen = Seen(
                    method=self.command,
                    path=target.path,
                    query=target.query,
                    authorization=self.headers.get("Authorization"),
                    last_event_id=self.headers.get("Last-Event-ID"),
                )
                with proxy._lock:
                    proxy.seen.append(seen)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Accept-Encoding"] = "identity"
                url = proxy.upstream + self.path
                with proxy._client.stream(
                    self.command, url, headers=headers, content=body
                ) as upstream:
                    seen.status = upstream.status_code
                    self.send_response(upstream.status_code)
                    for name, value in upstream.headers.multi_items():
                        if name.lower() not in _HOP:
                            self.send_header(name, value)
                    self.send_header("Connection", "close")
                    streaming = upstream.headers.get("content-type", "").startswith(
                        "text/event-stream"
                    )
                    if streaming:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        self._stream(upstream, seen)
                    else:
                        content = upstream.read()
                        seen.body = content
                        self.send_header("Content-Length", str(len(content)))
                        self.end_headers()
                        self.wfile.write(content)
                self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream(self, upstream: httpx.Response, seen: Seen) -> None:
                drop = proxy._take_drop()
                pending = b""
                for data in upstream.iter_raw():
                    pending += data
                    # Forward whole events only, so the ids recorded are the ids delivered.
                    while (end := _EVENT_END.search(pending)) is not None:
                        event, pending = pending[: end.end()], pending[end.end() :]
                        seen.event_ids.extend(i.decode() for i in _EVENT_ID.findall(event))
                        seen.comments += len(_COMMENT.findall(event))
                        self._chunk(event)
                        if drop and seen.event_ids:
                            # No last chunk: the client sees its connection cut mid-body.
                            seen.dropped = True
                            return
                if pending:
                    self._chunk(pending)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler
