"""Every failure talking to Replicate maps to a stable error code: client and httpx exceptions,
Retry-After and invalid_fields kept, token shapes scrubbed, and which failed creates may still
have started a prediction."""

from __future__ import annotations

import pickle

import httpx
import pytest
from replicate.exceptions import ReplicateError

from ai_handler_dagster import errors
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate import failures
from ai_handler_dagster.replicate.failures import ProviderHTTPError, classify, parse_retry_after


@pytest.mark.parametrize(
    ("status", "title", "code", "retryable"),
    [
        (401, "Unauthenticated", errors.UNAUTHORIZED, False),
        (403, "Forbidden", errors.UNAUTHORIZED, False),
        (404, "Not found", errors.MODEL_NOT_FOUND, False),
        (422, "Input validation failed", errors.INVALID_INPUT, False),
        (422, "Invalid version or not permitted", errors.MODEL_NOT_FOUND, False),
        (429, "Request was throttled", errors.RATE_LIMITED, True),
        (500, "Internal Server Error", errors.PROVIDER_UNAVAILABLE, True),
        (502, None, errors.PROVIDER_UNAVAILABLE, True),
        (503, None, errors.PROVIDER_UNAVAILABLE, True),
        (400, "Bad request", errors.INTERNAL_ERROR, False),
    ],
)
def test_classify_http_status(status: int, title: str | None, code: str, retryable: bool) -> None:
    err = classify(ReplicateError(status=status, title=title, detail="something"))
    assert (err.code, err.retryable) == (code, retryable)
    assert err.code in errors.ALL_CODES
    assert (err.code in errors.RETRYABLE_CODES) == retryable


def test_classify_keeps_invalid_fields_and_retry_after() -> None:
    invalid = ProviderHTTPError(
        status=422,
        title="Input validation failed",
        detail="- input.width: Must be less than or equal to 1024",
        invalid_fields=[{"type": "maximum", "field": "input.width", "description": "too big"}],
    )
    err = classify(invalid)
    assert err.code == errors.INVALID_INPUT
    assert "input.width" in err.message and "too big" in err.message

    throttled = classify(ProviderHTTPError(status=429, title="throttled", retry_after_s=7.0))
    assert throttled.retryable and throttled.retry_after_s == 7.0


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.PoolTimeout("pool"),
    ],
)
def test_classify_transport_errors_are_retryable(exc: Exception) -> None:
    err = classify(exc)
    assert err.code == errors.PROVIDER_UNAVAILABLE and err.retryable


def test_classify_unknown_and_generation_errors() -> None:
    original = GenerationError(errors.INSUFFICIENT_CREDITS, "no money")
    assert classify(original) is original
    err = classify(ValueError("boom"))
    assert err.code == errors.INTERNAL_ERROR and not err.retryable and "boom" in err.message


def test_classify_scrubs_token_shapes() -> None:
    err = classify(ValueError("header was Authorization: Bearer r8_SECRETsecret123"))
    assert "r8_SECRET" not in err.message and "r8_SECRET" not in repr(err)
    assert "[redacted]" in err.message


def test_may_have_been_accepted() -> None:
    """Only a refusal or a failure before sending makes a blind create retry safe."""
    assert not failures._may_have_been_accepted(httpx.ConnectError("refused"))
    assert not failures._may_have_been_accepted(ProviderHTTPError(status=429))
    assert not failures._may_have_been_accepted(ProviderHTTPError(status=422))
    assert failures._may_have_been_accepted(ProviderHTTPError(status=500))
    assert failures._may_have_been_accepted(httpx.ReadTimeout("slow"))
    assert failures._may_have_been_accepted(httpx.RemoteProtocolError("dropped"))


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_generation_error_pickles_with_all_attributes() -> None:
    err = GenerationError(errors.RATE_LIMITED, "slow down", True, retry_after_s=2.0)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message, copy.retryable, copy.retry_after_s) == (
        errors.RATE_LIMITED,
        "slow down",
        True,
        2.0,
    )
