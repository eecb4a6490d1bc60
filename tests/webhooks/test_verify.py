"""``verify`` implements Standard Webhooks as Replicate signs them, and refuses everything else.

Proves: the published test vector verifies (with its secret, id, timestamp and body); one
matching ``v1`` entry among several is enough (secret rotation) and other versions are ignored;
header names are case-insensitive; a wrong signature, a tampered body or id, another secret, a
timestamp older or further in the future than the tolerance, a non-numeric timestamp and missing
headers are refused; a malformed secret is an error, not a refusal of every delivery.
"""

from __future__ import annotations

import base64

import pytest

from ai_handler_dagster.devstack.emulator import sign_webhook
from ai_handler_dagster.webhooks import WebhookVerificationError, verify
from ai_handler_dagster.webhooks.receiver import decode_secret

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
OTHER_SECRET = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()


def _headers(signature: str = VECTOR_SIGNATURE, **overrides: str) -> dict[str, str]:
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": signature,
    }
    headers.update(overrides)
    return headers


def test_known_test_vector_verifies() -> None:
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS) == VECTOR_ID


def test_raw_key_and_secret_without_prefix_verify() -> None:
    key = decode_secret(VECTOR_SECRET)
    assert verify(_headers(), VECTOR_BODY, key, now=VECTOR_TS) == VECTOR_ID
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET[6:], now=VECTOR_TS) == VECTOR_ID


def test_header_names_are_case_insensitive() -> None:
    headers = {k.title(): v for k, v in _headers().items()}
    assert verify(headers, VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS) == VECTOR_ID


def test_any_v1_entry_may_match_and_other_versions_are_ignored() -> None:
    wrong = sign_webhook(OTHER_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    rotated = f"{wrong} v1a,{VECTOR_SIGNATURE[3:]} {VECTOR_SIGNATURE}"
    assert verify(_headers(rotated), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS) == VECTOR_ID
    # The right MAC under another version tag does not count.
    with pytest.raises(WebhookVerificationError, match="no webhook-signature"):
        verify(_headers(f"v2,{VECTOR_SIGNATURE[3:]}"), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS)


@pytest.mark.parametrize(
    ("headers", "body", "secret"),
    [
        pytest.param(_headers("v1,AAAA"), VECTOR_BODY, VECTOR_SECRET, id="wrong-signature"),
        pytest.param(_headers("v1,not base64!"), VECTOR_BODY, VECTOR_SECRET, id="garbage"),
        pytest.param(_headers(), b'{"test": 2432232315}', VECTOR_SECRET, id="tampered-body"),
        pytest.param(_headers(**{"webhook-id": "msg_other"}), VECTOR_BODY, VECTOR_SECRET, id="id"),
        pytest.param(_headers(), VECTOR_BODY, OTHER_SECRET, id="other-secret"),
    ],
)
def test_wrong_signatures_are_refused(headers: dict[str, str], body: bytes, secret: str) -> None:
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify(headers, body, secret, now=VECTOR_TS)


def test_timestamp_tolerance_both_ways() -> None:
    # Exactly at the edge is still fine; one second past it is not.
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS + 300) == VECTOR_ID
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS - 300) == VECTOR_ID
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS - 301)
    # The tolerance is configurable.
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET, tolerance_s=10, now=VECTOR_TS + 11)


def test_the_real_clock_is_the_default() -> None:
    # The vector is from 2021: far outside any tolerance today.
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_are_refused(missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(headers, VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS)


@pytest.mark.parametrize("value", ["-1614265330", "1614265330.5", "soon", "9" * 40])
def test_non_numeric_timestamps_are_refused(value: str) -> None:
    with pytest.raises(WebhookVerificationError, match="epoch seconds"):
        verify(_headers(**{"webhook-timestamp": value}), VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_***"])
def test_malformed_secret_is_an_error(secret: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        decode_secret(secret)
