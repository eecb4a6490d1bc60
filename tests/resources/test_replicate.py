"""The Replicate resource maps every failure to a stable error code and never pays twice.

Pure units (no network): error classification of client and httpx exceptions, Retry-After
parsing, model references, timestamps, snapshot errors, token scrubbing.

Over real HTTP against the Replicate emulator started in-process: create by model and by
version, 422/404/401 mapping, 429 retried into exactly one prediction, a create whose response
was dropped adopted instead of duplicated, ``wait_many`` over many predictions with failures
marked, a stuck prediction canceled at its deadline, and the token absent from every error.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import httpx
import pytest
from replicate.exceptions import ReplicateError

from ai_handler_dagster import errors
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.resources import replicate as rr
from ai_handler_dagster.resources.replicate import (
    PredictionSnapshot,
    ProviderHTTPError,
    ReplicateResource,
    classify,
    parse_model_ref,
    parse_retry_after,
    snapshot_error,
)

# --------------------------------------------------------------------------------------------
# Pure units


def _snapshot(**overrides: Any) -> PredictionSnapshot:
    data: dict[str, Any] = {
        "id": "p1",
        "status": "succeeded",
        "model": "demo/pixel-sketch",
        "version": "v1",
        "output": ["https://example.test/out.png"],
        "metrics": {"predict_time": 1.25},
        "urls": {"web": "https://replicate.com/p/p1", "get": "x"},
        "created_at": "2025-01-01T00:00:00.123456789Z",
    }
    data.update(overrides)
    return PredictionSnapshot.from_json(data)


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
    assert not rr._may_have_been_accepted(httpx.ConnectError("refused"))
    assert not rr._may_have_been_accepted(ProviderHTTPError(status=429))
    assert not rr._may_have_been_accepted(ProviderHTTPError(status=422))
    assert rr._may_have_been_accepted(ProviderHTTPError(status=500))
    assert rr._may_have_been_accepted(httpx.ReadTimeout("slow"))
    assert rr._may_have_been_accepted(httpx.RemoteProtocolError("dropped"))


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_parse_model_ref() -> None:
    assert parse_model_ref("demo/pixel-sketch") == ("demo/pixel-sketch", None)
    assert parse_model_ref("demo/pixel-sketch:abc123") == ("demo/pixel-sketch", "abc123")
    with pytest.raises(GenerationError) as info:
        parse_model_ref("not a model")
    assert info.value.code == errors.MODEL_NOT_FOUND


def test_parse_time_accepts_nanoseconds() -> None:
    assert rr._parse_time("2025-01-01T00:00:00.123456789Z") == pytest.approx(1735689600.123456)
    assert rr._parse_time("2025-01-01T00:00:00+00:00") == 1735689600.0
    assert rr._parse_time("2025-01-01T00:00:00") is None  # no zone: cannot compare clocks
    assert rr._parse_time(None) is None


def test_snapshot_properties_and_errors() -> None:
    ok = _snapshot()
    assert ok.is_terminal and ok.predict_time == 1.25 and ok.web_url == "https://replicate.com/p/p1"
    assert ok.raw["created_at"].endswith("Z")
    assert snapshot_error(ok) is None
    assert snapshot_error(_snapshot(status="processing")) is None
    assert not _snapshot(status="starting").is_terminal

    failed = snapshot_error(_snapshot(status="failed", error="CUDA out of memory"))
    assert failed is not None and failed.code == errors.PREDICTION_FAILED
    assert "CUDA out of memory" in failed.message
    canceled = snapshot_error(_snapshot(status="canceled"))
    assert canceled is not None and canceled.code == errors.PREDICTION_CANCELED
    aborted = _snapshot(status="aborted")
    assert aborted.is_terminal and snapshot_error(aborted).code == errors.PREDICTION_CANCELED  # type: ignore[union-attr]
    expired = snapshot_error(_snapshot(output=None, data_removed=True))
    assert expired is not None and expired.code == errors.OUTPUT_EXPIRED
    marked = dataclasses.replace(_snapshot(status="canceled"), deadline_exceeded=True)
    assert snapshot_error(marked).code == errors.DEADLINE_EXCEEDED  # type: ignore[union-attr]


def test_generation_error_pickles_with_all_attributes() -> None:
    err = GenerationError(errors.RATE_LIMITED, "slow down", True, retry_after_s=2.0)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message, copy.retryable, copy.retry_after_s) == (
        errors.RATE_LIMITED,
        "slow down",
        True,
        2.0,
    )


def test_cursor_never_leaves_base_origin() -> None:
    base = "http://127.0.0.1:5000"
    assert rr._cursor_path("http://127.0.0.1:5000/v1/predictions?cursor=a", base).startswith(base)
    assert rr._cursor_path("https://evil.test/v1/predictions?cursor=a", base) == (
        "/v1/predictions?cursor=a"
    )


def test_token_is_not_in_resource_repr() -> None:
    resource = ReplicateResource(api_token="r8_supersecret_value")
    assert "r8_supersecret_value" not in repr(resource)
    assert "r8_supersecret_value" not in str(resource)


def test_backoff_honours_retry_after_and_grows() -> None:
    resource = ReplicateResource(api_token="t", retry_backoff_s=0.1)
    assert 2.0 <= resource._backoff(1, 2.0) <= 2.5
    assert 0.05 <= resource._backoff(1) <= 0.1
    assert 0.4 <= resource._backoff(4) <= 0.8
    assert resource._backoff(50) <= rr._MAX_SLEEP_S
