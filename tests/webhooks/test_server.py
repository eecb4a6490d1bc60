"""The receiver over real HTTP: the right answer for every kind of delivery, and fast enough.

Proves, on SQLite and PostgreSQL: ``POST /webhooks/replicate`` answers 204 for accepted and
duplicate deliveries (on one kept-alive connection), 401 for a bad signature, 400 for a body
that is not a prediction, 413 for a body over 1 MiB announced by ``Content-Length`` or by
chunks *before* the body is sent (so it is never read), 404 elsewhere; ``GET /healthz``
reports the counters; refused requests leave the tables as they were; 300 deliveries from 8
threads are all recorded without an error (the load a burst of completions brings).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.models import PredictionState, WebhookDelivery
from ai_handler_dagster.webhooks import MAX_BODY_BYTES, WEBHOOK_PATH, ReceiverHandle
from tests.support.webhooks import prediction, signed, state_of, table_rows

MakeReceiver = Callable[..., ReceiverHandle]


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def test_answers_over_http(engine: sa.Engine, make_receiver: MakeReceiver) -> None:
    receiver = make_receiver(engine)
    assert receiver.webhook_url == f"{receiver.url}{WEBHOOK_PATH}"
    final = prediction("p1", "succeeded")
    with _client() as http:
        headers, body = signed(final, msg_id="msg_a")
        first = http.post(receiver.webhook_url, content=body, headers=headers)
        again = http.post(receiver.webhook_url, content=body, headers=headers)
        assert (first.status_code, again.status_code) == (204, 204)
        before = table_rows(engine)

        bad_sig = {**headers, "webhook-id": "msg_b"}  # signature was made for msg_a
        refused = http.post(receiver.webhook_url, content=body, headers=bad_sig)
        assert refused.status_code == 401
        headers, body = signed(b"not json", msg_id="msg_c")
        assert http.post(receiver.webhook_url, content=body, headers=headers).status_code == 400
        assert http.post(receiver.url + "/elsewhere", content=body).status_code == 404
        assert http.get(receiver.url + "/").status_code == 404

        health = http.get(receiver.url + "/healthz")
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "deliveries": {"accepted": 1, "duplicate": 1, "401": 1, "400": 1},
        }
    assert table_rows(engine) == before
    assert state_of(engine, "p1") == ("succeeded", final)


def _raw_exchange(receiver: ReceiverHandle, head: bytes, body_start: bytes) -> bytes:
    """Send a request head and only the start of its body; return what the server answers."""
    with socket.create_connection((receiver.host, receiver.port), timeout=5) as sock:
        sock.sendall(head + body_start)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_oversized_bodies_are_refused_before_reading(
    engine: sa.Engine, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(engine)
    headers, _ = signed(prediction("p1"))
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    # Announced length over the limit: the answer comes although the body never follows
    # (a server reading it all first would time out the 5 s socket instead).
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{lines}"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = _raw_exchange(receiver, head, b'{"id": "p1", ')
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"Connection: close" in answer
    # Chunked: refused at the first chunk that crosses the limit, before its data arrives.
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{lines}Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = _raw_exchange(receiver, head, f"{MAX_BODY_BYTES + 1:x}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert time.monotonic() - started < 4
    assert table_rows(engine) == ([], [])
    assert receiver.stats() == {"413": 2}


def test_chunked_body_within_the_limit_is_accepted(
    engine: sa.Engine, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(engine)
    headers, body = signed(prediction("p1"), msg_id="msg_chunked")

    def chunks() -> Any:
        yield body[:10]
        yield body[10:]

    with _client() as http:
        answer = http.post(receiver.webhook_url, content=chunks(), headers=headers)
    assert answer.status_code == 204
    assert state_of(engine, "p1") == ("succeeded", prediction("p1"))


def test_300_deliveries_from_8_threads_are_all_recorded(
    engine: sa.Engine, make_receiver: MakeReceiver
) -> None:
    receiver = make_receiver(engine)
    # Each prediction gets a processing and a succeeded event: 150 predictions, 300 deliveries.
    deliveries = []
    for i in range(150):
        for status in ("processing", "succeeded"):
            deliveries.append(signed(prediction(f"load{i}", status), msg_id=f"msg_{i}_{status}"))
    answers: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(part: list[tuple[dict[str, str], bytes]]) -> None:
        try:
            with _client() as http:  # one kept-alive connection per thread, like a sender
                for headers, body in part:
                    status = http.post(receiver.webhook_url, content=body, headers=headers)
                    with lock:
                        answers.append(status.status_code)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    # Thread k takes every 8th delivery: a prediction's two events go to different threads.
    threads = [threading.Thread(target=worker, args=(deliveries[k::8],)) for k in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert errors == []
    assert answers == [204] * 300
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(WebhookDelivery)) == 300
        statuses = conn.scalars(sa.select(PredictionState.status)).all()
    # Whatever order the two events of a prediction arrived in, it ends succeeded.
    assert sorted(statuses) == ["succeeded"] * 150
    stats = receiver.stats()
    assert stats["accepted"] + stats.get("out_of_order", 0) == 300
    # Far below the hundreds a second it manages; only a pathological slowdown trips this.
    assert elapsed < 20, f"300 deliveries took {elapsed:.1f}s"
    print(f"{engine.dialect.name}: 300 deliveries in {elapsed:.2f}s ({300 / elapsed:.0f}/s)")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_stop_releases_the_port(engine: sa.Engine, make_receiver: MakeReceiver, host: str) -> None:
    try:
        receiver = make_receiver(engine, host=host)
    except OSError:
        pytest.skip(f"{host} is not available here")
    with _client() as http:
        assert http.get(receiver.url + "/healthz").status_code == 200
    receiver.stop()
    receiver.stop()  # twice is fine
    with pytest.raises(OSError), socket.create_connection((host, receiver.port), timeout=1):
        pass
