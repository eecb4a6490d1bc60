"""The emulator's webhooks are signed per Standard Webhooks and delivered like Replicate's.

The signature matches the published test vector; a delivered webhook passes
``replicate.webhooks.validate`` with the secret from ``GET /v1/webhooks/default/secret`` (and a
timestamp tolerance) while a tampered one fails; the events filter is honoured; failed
deliveries are retried with the same ``webhook-id``; a receiver that hangs never slows the API.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import replicate
from replicate.webhook import InvalidSignatureError, WebhookSigningSecret

from ai_handler_dagster.devstack.emulator import EmulatorHandle, sign_webhook
from tests.support.emulator import client_for
from tests.support.webhooks import WebhookReceiver

HAIKU = "demo/haiku-text"


def _settled_webhook_stats(emulator: EmulatorHandle, key: str, value: int) -> dict[str, int]:
    """Webhook counters once ``key`` reached ``value``: a receiver sees a request a moment
    before the emulator has recorded the answer to it."""
    deadline = time.monotonic() + 5
    while True:
        stats = emulator.stats()["webhooks"]
        if stats[key] >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    signature = sign_webhook(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body.encode())

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": signature,
    }
    replicate.webhooks.validate(headers=headers, body=body, secret=WebhookSigningSecret(key=secret))


def test_delivered_webhooks_validate_with_the_client(
    emulator: EmulatorHandle, client: replicate.Client, webhook_receiver: WebhookReceiver
) -> None:
    prediction = client.models.predictions.create(
        model=HAIKU, input={"prompt": "bells"}, webhook=webhook_receiver.url
    )
    webhook_receiver.wait_for(
        lambda got: any(r.json()["status"] == "succeeded" for r in got), timeout=5
    )
    secret = client.webhooks.default.secret()
    assert secret.key == emulator.webhook_secret

    for delivery in webhook_receiver.received:
        replicate.webhooks.validate(
            headers=delivery.headers, body=delivery.body, secret=secret, tolerance=30
        )
        assert delivery.headers["webhook-id"].startswith("msg_")
        assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 30
        assert delivery.json()["id"] == prediction.id

    # Every event (default filter): start first, completed last, one webhook-id per event.
    statuses = [r.json()["status"] for r in webhook_receiver.received]
    assert statuses[0] == "processing"
    assert statuses[-1] == "succeeded"
    ids = [r.headers["webhook-id"] for r in webhook_receiver.received]
    assert len(set(ids)) == len(ids) >= 3
    final = webhook_receiver.received[-1].json()
    assert final["output"] == client.predictions.get(prediction.id).output

    tampered = webhook_receiver.received[-1]
    with pytest.raises(InvalidSignatureError):
        replicate.webhooks.validate(
            headers=tampered.headers,
            body=tampered.body.replace("succeeded", "failed"),
            secret=secret,
            tolerance=30,
        )


def test_events_filter_completed_only(
    client: replicate.Client, webhook_receiver: WebhookReceiver, emulator: EmulatorHandle
) -> None:
    client.models.predictions.create(
        model=HAIKU,
        input={"prompt": "one call"},
        webhook=webhook_receiver.url,
        webhook_events_filter=["completed"],
    )
    webhook_receiver.wait_for(lambda got: len(got) >= 1)
    assert emulator.wait_idle()
    time.sleep(0.1)  # nothing else may follow
    assert [r.json()["status"] for r in webhook_receiver.received] == ["succeeded"]
    assert _settled_webhook_stats(emulator, "delivered", 1)["delivered"] == 1


def test_failed_prediction_and_cancel_send_completed(
    client: replicate.Client, webhook_receiver: WebhookReceiver, emulator: EmulatorHandle
) -> None:
    emulator.configure(latency_s=5.0)
    running = client.models.predictions.create(
        model=HAIKU,
        input={"prompt": "cancel me"},
        webhook=webhook_receiver.url,
        webhook_events_filter=["completed"],
    )
    client.predictions.cancel(running.id)
    emulator.configure(latency_s=0.05)
    client.models.predictions.create(
        model=HAIKU,
        input={"prompt": "[fail]"},
        webhook=webhook_receiver.url,
        webhook_events_filter=["completed"],
    )
    webhook_receiver.wait_for(lambda got: len(got) >= 2)
    assert sorted(r.json()["status"] for r in webhook_receiver.received) == [
        "canceled",
        "failed",
    ]


def test_failed_deliveries_are_retried_with_the_same_id(
    make_emulator, webhook_receiver: WebhookReceiver
) -> None:
    emulator = make_emulator(latency_s=0.05, webhook_retry_delay_s=0.05)
    client = client_for(emulator)
    webhook_receiver.statuses = [500, 503]

    client.models.predictions.create(
        model=HAIKU,
        input={"prompt": "retry"},
        webhook=webhook_receiver.url,
        webhook_events_filter=["completed"],
    )
    webhook_receiver.wait_for(lambda got: len(got) >= 3)

    ids = {r.headers["webhook-id"] for r in webhook_receiver.received}
    assert len(ids) == 1
    for delivery in webhook_receiver.received:  # each attempt is signed afresh, all valid
        replicate.webhooks.validate(
            headers=delivery.headers,
            body=delivery.body,
            secret=WebhookSigningSecret(key=emulator.webhook_secret),
        )
    stats = _settled_webhook_stats(emulator, "delivered", 1)
    assert stats["attempts"] == 3
    assert stats["retried"] == 2
    assert stats["delivered"] == 1
    history = emulator.predictions()[0]["_emulator"]["webhook_deliveries"]
    assert [h["status_code"] for h in history] == [500, 503, 200]


def test_delivery_gives_up_after_max_attempts(
    make_emulator, webhook_receiver: WebhookReceiver
) -> None:
    emulator = make_emulator(latency_s=0.05, webhook_retry_delay_s=0.02, webhook_max_attempts=2)
    client = client_for(emulator)
    webhook_receiver.statuses = [500] * 10

    client.models.predictions.create(
        model=HAIKU,
        input={"prompt": "never"},
        webhook=webhook_receiver.url,
        webhook_events_filter=["completed"],
    )
    webhook_receiver.wait_for(lambda got: len(got) >= 2)
    time.sleep(0.15)
    assert len(webhook_receiver.received) == 2
    assert _settled_webhook_stats(emulator, "failed", 1)["failed"] == 1


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A URL whose server accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


def test_hanging_receiver_never_blocks_the_api(make_emulator, black_hole: str) -> None:
    emulator = make_emulator(latency_s=0.05, webhook_timeout_s=2.0, webhook_max_attempts=1)
    client = client_for(emulator)

    started = time.monotonic()
    for i in range(6):  # more predictions than webhook workers
        prediction = client.models.predictions.create(
            model=HAIKU, input={"prompt": f"p{i}"}, webhook=black_hole, wait=5
        )
        assert prediction.status == "succeeded"
    assert time.monotonic() - started < 1.5


def test_legacy_webhook_completed_field(
    emulator: EmulatorHandle, webhook_receiver: WebhookReceiver, http: httpx.Client
) -> None:
    response = http.post(
        f"{emulator.base_url}/v1/models/{HAIKU}/predictions",
        json={"input": {"prompt": "old style"}, "webhook_completed": webhook_receiver.url},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 201
    webhook_receiver.wait_for(lambda got: len(got) >= 1)
    assert emulator.wait_idle()
    time.sleep(0.05)
    assert [json.loads(r.body)["status"] for r in webhook_receiver.received] == ["succeeded"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"webhook": "ftp://example.invalid/x"}, "webhook"),
        (
            {"webhook": "http://127.0.0.1:9/x", "webhook_events_filter": ["done"]},
            "webhook_events_filter",
        ),
    ],
)
def test_invalid_webhook_options_are_422(
    emulator: EmulatorHandle, http: httpx.Client, body: dict, field: str
) -> None:
    response = http.post(
        f"{emulator.base_url}/v1/models/{HAIKU}/predictions",
        json={"input": {"prompt": "x"}, **body},
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["invalid_fields"]] == [field]
    assert emulator.stats()["creates"] == 0
