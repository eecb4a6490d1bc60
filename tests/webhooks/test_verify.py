"""``verify`` checks Standard Webhooks as Replicate signs them (through the ``standardwebhooks``
package), and the signing secret is checked before any delivery.

Proves: the published test vector verifies (with its secret, id, timestamp and body, at its
time); one matching ``v1`` entry among several is enough (secret rotation) and other versions
are ignored; header names are case-insensitive; a wrong or malformed signature, a tampered body
or id, another secret, a timestamp out of the five-minute tolerance either way, an unreadable
timestamp and missing headers are refused; the emulator's signer (our own code) and the
package agree; ``webhook_secret`` refuses an unset or malformed secret naming the variable,
never the value.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import standardwebhooks.webhooks

from ai_handler_dagster.devstack.emulator import sign_webhook
from ai_handler_dagster.settings import ConfigError
from ai_handler_dagster.webhooks import TOLERANCE_S, WebhookVerificationError, verify
from ai_handler_dagster.webhooks.config import SECRET_VAR, webhook_secret

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
OTHER_SECRET = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()


class _Clock:
    """The time ``standardwebhooks`` reads, set by the test."""

    at = float(VECTOR_TS)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Clock]]:
    """Stop the package's clock at the vector's time (its tolerance is against ``now``)."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:  # type: ignore[override]
            return cls.fromtimestamp(_Clock.at, tz=UTC)

    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", Frozen)
    _Clock.at = float(VECTOR_TS)
    yield _Clock


def _headers(signature: str = VECTOR_SIGNATURE, **overrides: str) -> dict[str, str]:
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": signature,
    }
    headers.update(overrides)
    return headers


def test_known_test_vector_verifies(clock: type[_Clock]) -> None:
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET) == VECTOR_ID
    # The emulator's signer, written apart from the package, makes the same signature.
    assert sign_webhook(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE


def test_raw_key_and_secret_without_prefix_verify(clock: type[_Clock]) -> None:
    key = base64.b64decode(VECTOR_SECRET.removeprefix("whsec_"))
    assert verify(_headers(), VECTOR_BODY, key) == VECTOR_ID
    assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET[6:]) == VECTOR_ID


def test_header_names_are_case_insensitive(clock: type[_Clock]) -> None:
    headers = {k.title(): v for k, v in _headers().items()}
    assert verify(headers, VECTOR_BODY, VECTOR_SECRET) == VECTOR_ID


def test_any_v1_entry_may_match_and_other_versions_are_ignored(clock: type[_Clock]) -> None:
    wrong = sign_webhook(OTHER_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    rotated = f"{wrong} v1a,{VECTOR_SIGNATURE[3:]} {VECTOR_SIGNATURE}"
    assert verify(_headers(rotated), VECTOR_BODY, VECTOR_SECRET) == VECTOR_ID
    # The right MAC under another version tag does not count.
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(_headers(f"v2,{VECTOR_SIGNATURE[3:]}"), VECTOR_BODY, VECTOR_SECRET)


@pytest.mark.parametrize(
    ("headers", "body", "secret", "message"),
    [
        pytest.param(_headers("v1,AAAA"), VECTOR_BODY, VECTOR_SECRET, "No matching", id="wrong"),
        pytest.param(_headers("v1,not base64!"), VECTOR_BODY, VECTOR_SECRET, "malformed", id="b64"),
        pytest.param(_headers("v1"), VECTOR_BODY, VECTOR_SECRET, "malformed", id="no-comma"),
        pytest.param(_headers(), b'{"test": 2432232315}', VECTOR_SECRET, "No matching", id="body"),
        pytest.param(
            _headers(**{"webhook-id": "msg_other"}), VECTOR_BODY, VECTOR_SECRET, "No", id="id"
        ),
        pytest.param(_headers(), VECTOR_BODY, OTHER_SECRET, "No matching", id="other-secret"),
    ],
)
def test_wrong_signatures_are_refused(
    clock: type[_Clock], headers: dict[str, str], body: bytes, secret: str, message: str
) -> None:
    with pytest.raises(WebhookVerificationError, match=message):
        verify(headers, body, secret)


def test_timestamp_tolerance_both_ways(clock: type[_Clock]) -> None:
    # Exactly at the edge is still fine; one second past it is not.
    for offset in (TOLERANCE_S, -TOLERANCE_S):
        clock.at = VECTOR_TS + offset
        assert verify(_headers(), VECTOR_BODY, VECTOR_SECRET) == VECTOR_ID
    clock.at = VECTOR_TS + TOLERANCE_S + 1
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET)
    clock.at = VECTOR_TS - TOLERANCE_S - 1
    with pytest.raises(WebhookVerificationError, match="too new"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET)


def test_the_real_clock_is_the_default() -> None:
    # The vector is from 2021: far outside any tolerance today.
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_headers(), VECTOR_BODY, VECTOR_SECRET)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_are_refused(clock: type[_Clock], missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="Missing"):
        verify(headers, VECTOR_BODY, VECTOR_SECRET)


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "9" * 40, "-1614265330"])
def test_unreadable_timestamps_are_refused(clock: type[_Clock], value: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(_headers(**{"webhook-timestamp": value}), VECTOR_BODY, VECTOR_SECRET)


def test_a_body_that_is_not_utf8_cannot_be_verified(clock: type[_Clock]) -> None:
    with pytest.raises(ValueError):
        verify(_headers(), b"\xff\xfe", VECTOR_SECRET)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "must be set"),
        ("", "must be set"),
        ("whsec_", "not 'whsec_' followed by base64"),
        ("whsec_***not-base64***", "not 'whsec_' followed by base64"),
    ],
)
def test_an_unusable_secret_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, value: str | None, message: str
) -> None:
    if value is None:
        monkeypatch.delenv(SECRET_VAR, raising=False)
    else:
        monkeypatch.setenv(SECRET_VAR, value)
    with pytest.raises(ConfigError, match=message) as raised:
        webhook_secret()
    assert SECRET_VAR in str(raised.value)
    if value and value != "whsec_":
        assert value not in str(raised.value)


def test_a_usable_secret_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VAR, f"  {VECTOR_SECRET}\n")
    assert webhook_secret() == VECTOR_SECRET
