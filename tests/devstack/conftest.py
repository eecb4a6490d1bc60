"""Fixtures for the devstack tests: live emulators, real ``replicate`` clients, and a real HTTP
receiver for webhooks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import replicate

from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator
from tests.support.emulator import FAST, TLS, client_for
from tests.support.webhooks import Received, WebhookReceiver


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


@pytest.fixture
def client(emulator: EmulatorHandle) -> replicate.Client:
    """A ``replicate.Client`` for the ``emulator`` fixture."""
    return client_for(emulator)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A plain HTTP client for raw requests (no proxies from the environment)."""
    with httpx.Client(trust_env=False, timeout=10, verify=TLS) as c:
        yield c


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
