"""Fixtures for the devstack tests: live emulators, real ``replicate`` clients, and a real HTTP
receiver for webhooks."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import replicate

from ai_handler_dagster.devstack.emulator import (
    EmulatorConfig,
    EmulatorHandle,
    start_emulator,
)

# Short latency: tests exercise the lifecycle, not the clock.
FAST = EmulatorConfig(latency_s=0.1, concurrency=8)

# Every httpx client loads the CA bundle (about 0.1 s on a busy machine), although these tests
# only speak plain HTTP on loopback; one shared context keeps client creation free.
_TLS = ssl.create_default_context()


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., EmulatorHandle]]:
    """Start emulators with a given config (or keyword settings); all stopped at teardown."""
    handles: list[EmulatorHandle] = []

    def make(config: EmulatorConfig | None = None, **settings: Any) -> EmulatorHandle:
        cfg = (config or FAST).updated(**settings) if settings else (config or FAST)
        handle = start_emulator(cfg, host="127.0.0.1", port=0)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def emulator(make_emulator: Callable[..., EmulatorHandle]) -> EmulatorHandle:
    """A running emulator with fast models and no faults."""
    return make_emulator()


def client_for(
    handle: EmulatorHandle, *, token: str | None = None, **kwargs: Any
) -> replicate.Client:
    """The official client pointed at ``handle`` (no environment proxies), polling fast."""
    client = replicate.Client(
        api_token=token or handle.token,
        base_url=handle.base_url,
        trust_env=False,
        transport=httpx.HTTPTransport(verify=_TLS),
        **kwargs,
    )
    client.poll_interval = 0.02  # Prediction.wait() sleeps this long between gets
    return client


@pytest.fixture
def client(emulator: EmulatorHandle) -> replicate.Client:
    """A ``replicate.Client`` for the ``emulator`` fixture."""
    return client_for(emulator)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client for raw requests (no proxies from the environment)."""
    with httpx.Client(trust_env=False, timeout=10, verify=_TLS) as c:
        yield c


@dataclass
class Received:
    """One request the webhook receiver got."""

    headers: dict[str, str]
    body: str
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A real HTTP server recording POSTs; answers each with the next of ``statuses``."""

    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(received)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(list(self.received)):
                    return
            time.sleep(0.01)
        raise AssertionError(f"webhooks not received in time; got {len(self.received)}")


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A live receiver at ``receiver.url``; set ``receiver.statuses`` to make it fail."""
    receiver: WebhookReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            with receiver.lock:
                receiver.received.append(Received(dict(self.headers.items()), body, time.time()))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
