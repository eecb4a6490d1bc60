"""Every failure talking to Replicate as a :class:`~ai_handler_dagster.errors.GenerationError`.

:func:`classify` gives each exception a stable code and a ``retryable`` flag, and scrubs anything
shaped like a token from the message. The client's own ``ReplicateError`` keeps only the
problem's title and detail, so an httpx response hook (:func:`_raise_problem`) raises a richer
subclass, :class:`ProviderHTTPError`, that also keeps ``Retry-After`` and ``invalid_fields``.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from typing import Any

import httpx
from replicate.exceptions import ModelError, ReplicateError

from ai_handler_dagster import errors
from ai_handler_dagster.errors import GenerationError

#: Longest message kept from a provider error (model errors can carry whole tracebacks).
_MAX_MESSAGE_CHARS = 2000

# Shapes of secrets that must never reach an error message, whatever produced the message.
_SECRET_PATTERNS = (re.compile(r"(?i)bearer\s+\S+"), re.compile(r"\br8_[0-9A-Za-z_]+"))


class ProviderHTTPError(ReplicateError):
    """A ``ReplicateError`` that also keeps ``Retry-After`` and the 422 ``invalid_fields``.

    Raised by this module's response hook in place of the client's own ``ReplicateError``, which
    keeps neither.
    """

    def __init__(
        self,
        *,
        status: int,
        title: str | None = None,
        detail: str | None = None,
        type: str | None = None,
        instance: str | None = None,
        retry_after_s: float | None = None,
        invalid_fields: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(type=type, title=title, status=status, detail=detail, instance=instance)
        self.retry_after_s = retry_after_s
        self.invalid_fields = invalid_fields or []

    @classmethod
    def from_http_response(cls, response: httpx.Response) -> ProviderHTTPError:
        """Parse a problem+json (or any) error response."""
        try:
            data = response.json()
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        fields = data.get("invalid_fields")
        return cls(
            status=response.status_code,
            title=data.get("title"),
            detail=_error_text(data.get("detail")),
            type=data.get("type"),
            instance=data.get("instance"),
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            invalid_fields=[f for f in fields if isinstance(f, dict)]
            if isinstance(fields, list)
            else None,
        )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), if valid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify(exc: BaseException) -> GenerationError:
    """Map any exception raised while talking to Replicate to a :class:`GenerationError`.

    Terminal: 401/403 ``unauthorized``, 404 ``model_not_found``, 422 ``invalid_input`` (or
    ``model_not_found`` for "Invalid version or not permitted"), a model error
    ``prediction_failed``. Retryable: 429 ``rate_limited`` (with ``retry_after_s``), 5xx, 408,
    connection errors and timeouts ``provider_unavailable``. Anything else is ``internal_error``.
    Messages are scrubbed of anything shaped like a token.
    """
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, ReplicateError):
        return _classify_http(exc)
    if isinstance(exc, ModelError):
        detail = _truncate(str(exc.prediction.error or "no error message"))
        return GenerationError(
            errors.PREDICTION_FAILED, f"prediction {exc.prediction.id} failed: {detail}"
        )
    if isinstance(exc, httpx.TimeoutException):
        return GenerationError(
            errors.PROVIDER_UNAVAILABLE,
            _scrub(f"request to Replicate timed out ({type(exc).__name__})"),
            retryable=True,
        )
    if isinstance(exc, httpx.TransportError):
        return GenerationError(
            errors.PROVIDER_UNAVAILABLE,
            _scrub(f"connection to Replicate failed ({type(exc).__name__}: {exc})"),
            retryable=True,
        )
    return GenerationError(
        errors.INTERNAL_ERROR,
        _scrub(_truncate(f"unexpected error talking to Replicate: {type(exc).__name__}: {exc}")),
    )


def _classify_http(exc: ReplicateError) -> GenerationError:
    status = exc.status or 0
    title = exc.title or ""
    detail = exc.detail or ""
    summary = _scrub(_truncate(" - ".join(p for p in (title, detail) if p) or f"HTTP {status}"))
    retry_after = getattr(exc, "retry_after_s", None)
    if status in (401, 403):
        return GenerationError(errors.UNAUTHORIZED, f"Replicate refused the API token: {summary}")
    if status == 404:
        return GenerationError(errors.MODEL_NOT_FOUND, f"model or version not found: {summary}")
    if status == 422:
        # Replicate answers 422 both for bad input and for a version id it does not know.
        if "version" in title.lower() and "input" not in title.lower():
            return GenerationError(errors.MODEL_NOT_FOUND, f"version not usable: {summary}")
        fields = [
            f"{f.get('field', '?')}: {f.get('description', f.get('type', 'invalid'))}"
            for f in getattr(exc, "invalid_fields", [])
        ]
        message = summary if not fields else f"{summary} (invalid fields: {'; '.join(fields)})"
        return GenerationError(errors.INVALID_INPUT, _scrub(_truncate(message)))
    if status == 429:
        return GenerationError(
            errors.RATE_LIMITED,
            f"Replicate throttled the request: {summary}",
            retryable=True,
            retry_after_s=retry_after,
        )
    if status >= 500 or status == 408:
        return GenerationError(
            errors.PROVIDER_UNAVAILABLE,
            f"Replicate answered HTTP {status}: {summary}",
            retryable=True,
            retry_after_s=retry_after,
        )
    return GenerationError(errors.INTERNAL_ERROR, f"Replicate answered HTTP {status}: {summary}")


def _may_have_been_accepted(exc: BaseException) -> bool:
    """Whether a failed create may still have started a (paid) prediction on the server.

    Only failures that provably happened before the request reached the server, or that the
    server answered with a refusal (4xx), are safe to retry blindly.
    """
    if isinstance(exc, ReplicateError):
        return (exc.status or 0) >= 500 or exc.status == 408
    # Never sent: no connection, or refused by our own checks. Anything else (read/write
    # timeouts, dropped connections, a 2xx answer we could not parse) may have been accepted.
    never_sent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, GenerationError)
    return not isinstance(exc, never_sent)


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub("[redacted]", text)
    return text


def _redacted(err: GenerationError, secret: str) -> GenerationError:
    clean = _scrub(err.message, secret)
    if clean == err.message:
        return err
    return GenerationError(err.code, clean, err.retryable, retry_after_s=err.retry_after_s)


def _error_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _raise_problem(response: httpx.Response) -> None:
    """httpx response hook: turn an error response into a :class:`ProviderHTTPError`.

    Runs after the client's retry transport, so it only sees the final answer of a request.
    """
    if response.status_code >= 400:
        response.read()
        raise ProviderHTTPError.from_http_response(response)


def _with_cause(err: GenerationError, cause: BaseException) -> GenerationError:
    """Chain ``cause`` to ``err`` unless they are the same exception (no self-cycles)."""
    if err is not cause:
        err.__cause__ = cause
    return err
