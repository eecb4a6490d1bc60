"""The Replicate resource: create, watch and cancel predictions without losing or doubling money.

Everything goes through the official ``replicate`` client (its auth, base URL, timeouts and its own
GET retries on 429/503/504). This module adds what the client leaves to its callers:

* **Error mapping.** Every failure becomes a :class:`~ai_handler_dagster.errors.GenerationError`
  with a stable code and a ``retryable`` flag (:func:`classify`, :func:`snapshot_error`).
* **Safe create retries.** The client never retries a POST, and Replicate has no idempotency key.
  :meth:`ReplicateResource.create` retries throttling, 5xx, timeouts and dropped connections, and
  before each retry after a response that may have been lost it looks for the prediction the lost
  attempt created and *adopts* it, so one generation never pays for two predictions.
* **Efficient waiting.** :meth:`ReplicateResource.wait_many` watches hundreds of predictions from
  one loop and a small thread pool, with per-prediction adaptive polling, a shared pause on 429,
  optional webhook-fed state, and cancellation at a deadline.
* **A provider-side deadline.** Every create carries ``Cancel-After`` (``cancel_after_s``), so a
  prediction stops even when the process that should cancel it has died.

Two details of the client shape the code. Its ``ReplicateError`` keeps only the problem's title
and detail, so an httpx response hook (:func:`_raise_problem`) raises a richer subclass that also
keeps ``Retry-After`` and ``invalid_fields``. And its ``Prediction`` model (pydantic v1, client
1.0.7) drops ``data_removed`` and rejects statuses newer than the client (``aborted``); both
decide what happens to money, so reads (get, list, cancel) use the client's request method and
keep the raw JSON.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import email.utils
import hashlib
import heapq
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import httpx
import replicate
from pydantic import Field
from replicate.exceptions import ModelError, ReplicateError

from ai_handler_dagster import errors
from ai_handler_dagster.domain import (
    PREDICTION_TERMINAL,
    InvalidModelRef,
    ModelRef,
    PredictionStatus,
    parse_model_ref,
)
from ai_handler_dagster.errors import GenerationError

#: Upper bound of any single backoff sleep, whatever the attempt number or Retry-After says.
_MAX_SLEEP_S = 60.0
#: Pages of ``GET /v1/predictions`` (100 each) scanned when looking for a lost create: a few
#: minutes of an account creating at Replicate's limit of about 600 a minute.
_ADOPT_MAX_PAGES = 50
#: Longest message kept from a provider error (model errors can carry whole tracebacks).
_MAX_MESSAGE_CHARS = 2000

# Shapes of secrets that must never reach an error message, whatever produced the message.
_SECRET_PATTERNS = (re.compile(r"(?i)bearer\s+\S+"), re.compile(r"\br8_[0-9A-Za-z_]+"))


# --------------------------------------------------------------------------------------------
# Snapshots


@dataclass(frozen=True)
class PredictionSnapshot:
    """An immutable view of one prediction at one moment, as the API (or a webhook) showed it.

    ``raw`` is the JSON object exactly as received, for storage and for fields not modelled here.
    ``deadline_exceeded`` is set only by :meth:`ReplicateResource.wait_many`: the prediction ran
    past the caller's deadline and was canceled by us; its ``status`` is then ``canceled`` (even
    if the provider had not finished canceling yet) and :func:`snapshot_error` reports
    ``deadline_exceeded`` rather than ``prediction_canceled``.

    ``unreadable`` is set only by ``wait_many`` too: the provider's answers about this one
    prediction could not be used (unknown id, an answer that is not a prediction); the snapshot
    is ``failed`` and :func:`snapshot_error` reports that error.
    """

    id: str
    status: str
    model: str | None
    version: str | None
    output: Any
    error: str | None
    metrics: Mapping[str, Any]
    data_removed: bool
    urls: Mapping[str, str]
    created_at: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    deadline_exceeded: bool = False
    unreadable: GenerationError | None = field(default=None, compare=False)

    @classmethod
    def unreadable_as(cls, prediction_id: str, error: GenerationError) -> PredictionSnapshot:
        """A ``failed`` stand-in for a prediction whose state cannot be read (see above)."""
        return cls(
            id=prediction_id,
            status=PredictionStatus.FAILED,
            model=None,
            version=None,
            output=None,
            error=error.message,
            metrics={},
            data_removed=False,
            urls={},
            created_at=None,
            unreadable=error,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictionSnapshot:
        """Build a snapshot from a prediction JSON object (API response or webhook payload)."""
        if not data.get("id") or not data.get("status"):
            raise GenerationError(
                errors.INTERNAL_ERROR, "prediction JSON without id or status from the provider"
            )
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            model=data.get("model"),
            version=data.get("version"),
            output=data.get("output"),
            error=_error_text(data.get("error")),
            metrics=dict(data.get("metrics") or {}),
            data_removed=bool(data.get("data_removed", False)),
            urls=dict(data.get("urls") or {}),
            created_at=data.get("created_at"),
            raw=dict(data),
        )

    @property
    def is_terminal(self) -> bool:
        """True once the prediction can no longer change (succeeded, failed, canceled, aborted)."""
        return self.status in PREDICTION_TERMINAL

    @property
    def predict_time(self) -> float | None:
        """Seconds of model time billed by the provider (``metrics.predict_time``), if known."""
        value = self.metrics.get("predict_time")
        return float(value) if isinstance(value, int | float) else None

    @property
    def web_url(self) -> str | None:
        """The provider's page for this prediction (``urls.web``), if it gave one."""
        return self.urls.get("web")


def _error_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def snapshot_error(snapshot: PredictionSnapshot) -> GenerationError | None:
    """The error a terminal snapshot stands for, or ``None`` if it is usable (or still running).

    ``deadline_exceeded`` (our cancel at the deadline) wins over the plain canceled status; a
    succeeded prediction whose outputs the provider already deleted is ``output_expired``.
    """
    if snapshot.unreadable is not None:
        return snapshot.unreadable
    if snapshot.deadline_exceeded:
        return GenerationError(
            errors.DEADLINE_EXCEEDED,
            f"prediction {snapshot.id} ran past its deadline and was canceled",
        )
    if snapshot.status == PredictionStatus.FAILED:
        detail = _truncate(snapshot.error or "no error message")
        return GenerationError(
            errors.PREDICTION_FAILED, f"prediction {snapshot.id} failed: {detail}"
        )
    if snapshot.status in (PredictionStatus.CANCELED, PredictionStatus.ABORTED):
        return GenerationError(
            errors.PREDICTION_CANCELED, f"prediction {snapshot.id} was {snapshot.status}"
        )
    if snapshot.status == PredictionStatus.SUCCEEDED and snapshot.data_removed:
        return GenerationError(
            errors.OUTPUT_EXPIRED,
            f"prediction {snapshot.id} succeeded but the provider already removed its output",
        )
    return None


# --------------------------------------------------------------------------------------------
# Error classification


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


# --------------------------------------------------------------------------------------------
# Client construction


def _raise_problem(response: httpx.Response) -> None:
    """httpx response hook: turn an error response into a :class:`ProviderHTTPError`.

    Runs after the client's retry transport, so it only sees the final answer of a request.
    """
    if response.status_code >= 400:
        response.read()
        raise ProviderHTTPError.from_http_response(response)


def _cancel_after_hook(cancel_after_s: float | None) -> Callable[[httpx.Request], None]:
    """httpx request hook adding ``Cancel-After`` to every create (POST ``.../predictions``).

    A server-side deadline is the safety net for a worker that dies while a prediction runs:
    the provider stops it (and its billing) even if nobody is left to cancel it.
    """

    def add_header(request: httpx.Request) -> None:
        if (
            cancel_after_s
            and request.method == "POST"
            and request.url.path.endswith("/predictions")
        ):
            request.headers["Cancel-After"] = f"{max(1, round(cancel_after_s))}s"

    return add_header


_ClientKey = tuple[str, str, float, float | None]
_CLIENTS: dict[_ClientKey, replicate.Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(
    base_url: str, token: str, timeout_s: float, cancel_after_s: float | None
) -> replicate.Client:
    """One client (one connection pool) per endpoint, token and settings, shared by threads.

    Resources are frozen pydantic models that Dagster copies freely, so the client lives in a
    module cache; the key holds a hash of the token, never the token itself.
    """
    key = (base_url, hashlib.sha256(token.encode()).hexdigest(), timeout_s, cancel_after_s)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = replicate.Client(
                api_token=token,
                base_url=base_url,
                timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                event_hooks={
                    "request": [_cancel_after_hook(cancel_after_s)],
                    "response": [_raise_problem],
                },
            )
            # The client builds its httpx client lazily without a lock; build it here, once.
            _ = client._client
            _CLIENTS[key] = client
        return client


def checked_model_ref(reference: str) -> ModelRef:
    """The parsed reference; a malformed one is ``model_not_found`` (no request is made)."""
    try:
        return parse_model_ref(reference)
    except InvalidModelRef as exc:
        raise GenerationError(errors.MODEL_NOT_FOUND, str(exc)) from None


def _normalize_json(value: Any) -> Any:
    """The JSON value as the API would echo it, for comparing inputs."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (any number of fraction digits), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    # Python 3.11 accepts at most microseconds; providers may send nanoseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


# --------------------------------------------------------------------------------------------
# The resource


#: Longest wait between two looks at the webhook state of a prediction (a database read).
WEBHOOK_LOOKUP_MAX_S = 0.25


#: How often a watched prediction asks the list sweep for news (the sweep itself refreshes at
#: its own, slower pace).
SWEEP_LOOKUP_S = 0.25


class ListSweep:
    """Prediction states from listing recent predictions: one request answers for up to a page
    (100 on Replicate) of predictions, instead of one GET each.

    Without webhooks, hundreds of predictions polled one GET at a time cost several requests
    each (7 per generation measured with 384 in flight); the list costs a fraction of one. A
    refresh reads pages newest first until it has seen every pending prediction, or passes the
    oldest one's creation time (the provider's own clock, learned from the list), or reads
    ``max_pages``. Refreshes are at least ``min_interval_s`` apart, and ``per_page_s`` per page
    read last time (at most ``max_interval_s``): the bigger the list, the slower the sweep, so
    the request rate stays bounded.

    A prediction the last refresh did not see (beyond ``max_pages``, the list unreadable, or a
    finished entry without its output or metrics) is not ``covered``: ``wait_many`` polls it
    with GETs as usual. Used by one ``wait_many`` loop (not thread-safe).
    """

    def __init__(
        self,
        resource: ReplicateResource,
        ids: Iterable[str],
        *,
        min_interval_s: float = 0.5,
        max_interval_s: float = 2.0,
        per_page_s: float = 0.25,
        max_pages: int = 20,
    ) -> None:
        self._resource = resource
        self._pending = set(ids)
        self._min_interval_s = min_interval_s
        self._max_interval_s = max_interval_s
        self._per_page_s = per_page_s
        self._max_pages = max_pages
        self._created: dict[str, float] = {}
        self._states: dict[str, PredictionSnapshot] = {}
        self._covered: frozenset[str] = frozenset()
        self._refreshed_at = float("-inf")
        self._interval = min_interval_s
        #: List requests made (for tests and metrics).
        self.requests = 0

    def __call__(self, prediction_id: str) -> PredictionSnapshot | None:
        """The state of ``prediction_id`` as of the latest refresh (refreshing first if due)."""
        if not self._terminal(prediction_id) and (
            time.monotonic() - self._refreshed_at >= self._interval
        ):
            self.refresh()
        return self._states.get(prediction_id)

    def covers(self, prediction_id: str) -> bool:
        """True if the latest refresh saw this prediction (no GET needed for it)."""
        return prediction_id in self._covered

    def refresh(self) -> None:
        pending = {p for p in self._pending if not self._terminal(p)}
        floor = (
            min(self._created[p] for p in pending)
            if pending and all(p in self._created for p in pending)
            else None
        )
        seen: set[str] = set()
        pages = 0
        try:
            for page in _list_pages(self._resource, self._max_pages if pending else 0, attempts=1):
                pages += 1
                self.requests += 1
                oldest = self._read_page(page, pending, seen)
                if seen >= pending:
                    break
                if floor is not None and oldest is not None and oldest < floor:
                    break  # newest first: everything further is older than what we wait for
        except GenerationError as err:
            # The list is unreadable for now: the predictions not seen yet are polled one by one
            # (their GETs handle throttling), and the sweep tries again at its next turn.
            dg.get_dagster_logger().debug(f"prediction list unreadable: {err.message}")
        self._covered = frozenset(seen)
        self._refreshed_at = time.monotonic()
        self._interval = min(
            self._max_interval_s, max(self._min_interval_s, self._per_page_s * pages)
        )

    def _terminal(self, prediction_id: str) -> bool:
        known = self._states.get(prediction_id)
        return known is not None and known.is_terminal

    def _read_page(
        self, page: Mapping[str, Any], pending: set[str], seen: set[str]
    ) -> float | None:
        oldest: float | None = None
        for item in page.get("results") or []:
            if not isinstance(item, dict):
                continue
            created = parse_time(item.get("created_at"))
            if created is not None:
                oldest = created if oldest is None else min(oldest, created)
            prediction_id = item.get("id")
            if not isinstance(prediction_id, str) or prediction_id not in pending:
                continue
            if created is not None:
                self._created[prediction_id] = created
            try:
                snapshot = PredictionSnapshot.from_json(item)
            except Exception:  # an entry we cannot read: a GET reads the whole prediction
                continue
            if snapshot.is_terminal and not {"output", "metrics"} <= item.keys():
                continue  # a summary without the result: a GET reads the whole prediction
            self._states[prediction_id] = snapshot
            seen.add(prediction_id)
        return oldest


@dataclass
class _Watch:
    """Polling state of one prediction inside :meth:`ReplicateResource.wait_many`."""

    prediction_id: str
    deadline_at: float
    interval: float
    last_get_at: float = float("-inf")
    cancel_failures: int = 0


class ReplicateResource(dg.ConfigurableResource):
    """Creates, watches and cancels Replicate predictions; every failure is a GenerationError.

    Thread-safe: all methods may be called from many threads; they share one HTTP connection
    pool per (base URL, token).
    """

    api_token: str | None = Field(
        default=None,
        repr=False,
        description=(
            "Replicate API token. Set it with EnvVar('REPLICATE_API_TOKEN'); it is never logged. "
            "Unset, every call to the provider fails as unauthorized."
        ),
    )
    base_url: str = Field(
        default="https://api.replicate.com",
        description="API root (the emulator's URL in the embedded stack). Paths start with /v1.",
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Read/write timeout of one HTTP request in seconds (connect: at most 5 s).",
    )
    create_attempts: int = Field(
        default=5,
        ge=1,
        description=(
            "Attempts of one create on 429, 5xx, timeouts and dropped connections. A create "
            "whose answer was lost is found and adopted rather than repeated."
        ),
    )
    request_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts of one get, cancel or list on transient errors.",
    )
    retry_backoff_s: float = Field(
        default=0.5,
        gt=0,
        description="First retry delay; doubles per attempt, with jitter (Retry-After wins).",
    )
    poll_initial_s: float = Field(
        default=0.5,
        gt=0,
        description="First polling interval of a prediction; grows x1.5 per poll.",
    )
    poll_max_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest polling interval; also the interval when a webhook is expected.",
    )
    webhook_fallback_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "When webhooks are expected, poll the API for a prediction only this often, as a "
            "safety net for a webhook that never arrives."
        ),
    )
    deadline_s: float = Field(
        default=1800.0,
        gt=0,
        description=(
            "Default time a prediction may take from when wait_many starts watching it; past "
            "it the prediction is canceled and reported as deadline_exceeded."
        ),
    )
    cancel_after_s: float | None = Field(
        default=2400.0,
        description=(
            "Sent as the Cancel-After header of every create: the provider cancels the "
            "prediction by itself after this many seconds, even if this process died. Keep it "
            "above deadline_s; null disables it."
        ),
    )
    adopt_window_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "Clock allowance between us and the provider when looking for a lost create: "
            "predictions created up to this many seconds before the attempt's first create "
            "are candidates for adoption (the nearest in time is taken first)."
        ),
    )
    poll_workers: int = Field(
        default=8,
        ge=1,
        description="Threads wait_many uses for concurrent GETs, whatever the number of ids.",
    )

    # ---- plumbing ---------------------------------------------------------------------------

    def _client(self, cancel_after_s: float | None = None) -> replicate.Client:
        if not self.api_token:
            raise GenerationError(errors.UNAUTHORIZED, "no Replicate API token is configured")
        return _shared_client(
            self.base_url.rstrip("/"),
            self.api_token,
            self.timeout_s,
            self.cancel_after_s if cancel_after_s is None else cancel_after_s,
        )

    def _classify(self, exc: BaseException) -> GenerationError:
        return _redacted(classify(exc), self.api_token or "")

    def _backoff(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Sleep before retry number ``attempt`` (1-based): Retry-After, else jittered doubling."""
        if retry_after_s is not None:
            # A small jitter keeps many throttled workers from retrying in the same instant.
            return min(_MAX_SLEEP_S, retry_after_s + random.uniform(0, 0.1 + retry_after_s / 10))
        base = min(_MAX_SLEEP_S, self.retry_backoff_s * (2 ** (attempt - 1)))
        return random.uniform(base / 2, base)

    def _request_json(
        self, method: str, path: str, *, attempts: int | None = None
    ) -> dict[str, Any]:
        """One idempotent request (GET, cancel) with retries of transient errors; raw JSON."""
        client = self._client()
        attempts = attempts or self.request_attempts
        for attempt in range(1, attempts + 1):
            try:
                # The client's request method: the public models drop fields we need (see top).
                response = client._request(method, path)
                data = response.json()
                if not isinstance(data, dict):
                    raise GenerationError(
                        errors.INTERNAL_ERROR, f"{method} {path}: answer is not a JSON object"
                    )
                return data
            except Exception as exc:
                err = _with_cause(self._classify(exc), exc)
                if not err.retryable or attempt == attempts:
                    raise err  # noqa: B904 - the cause is set above
                time.sleep(self._backoff(attempt, err.retry_after_s))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- create -----------------------------------------------------------------------------

    def create(
        self,
        model_ref: str,
        input: Mapping[str, Any],
        *,
        webhook: str | None = None,
        webhook_events_filter: Iterable[str] | None = None,
        adopt: Callable[[], PredictionSnapshot | None] | None = None,
        maybe_created: bool = False,
        cancel_after_s: float | None = None,
        before_try: Callable[[], None] | None = None,
    ) -> PredictionSnapshot:
        """Start a prediction of ``model_ref`` (``owner/name`` or ``owner/name:version``).

        Transient failures are retried up to ``create_attempts`` times with backoff (429 waits
        ``Retry-After``). When an attempt's answer was lost after the server may have accepted
        it (timeout, dropped connection, 5xx), every later attempt first calls ``adopt()``,
        which looks for the prediction the lost attempt created (see
        :meth:`lost_create_candidates`) and returns it, made this caller's own, or None. While
        ``adopt`` raises, nothing is created. Without ``adopt`` a lost answer is never retried
        blindly: the error is raised.

        ``maybe_created`` makes the very first attempt call ``adopt()`` before creating: pass it
        when this attempt may already have called ``create`` (an op retry, a resumed run).

        ``cancel_after_s`` replaces the resource's ``Cancel-After`` for this create (a model's
        own deadline, see ``lifetimes.py``). ``before_try()`` is called right before each
        create request (to note that an answer is in flight).

        Raises:
            GenerationError: terminal errors at once; retryable ones after the last attempt.
        """
        ref = checked_model_ref(model_ref)
        client = self._client(cancel_after_s)
        payload = dict(input)
        params: dict[str, Any] = {}
        if webhook is not None:
            params["webhook"] = webhook
        if webhook_events_filter is not None:
            params["webhook_events_filter"] = list(webhook_events_filter)

        error: GenerationError | None = None
        for attempt in range(1, self.create_attempts + 1):
            if error is not None:
                time.sleep(self._backoff(attempt - 1, error.retry_after_s))
            if maybe_created:
                if adopt is None:
                    break
                try:
                    adopted = adopt()
                except GenerationError as exc:  # the list could not be read: nothing is created
                    error = exc
                    if not exc.retryable:
                        break
                    continue
                if adopted is not None:
                    return adopted
            if before_try is not None:
                before_try()
            try:
                if ref.version is not None:
                    prediction = client.predictions.create(
                        version=ref.version, input=payload, **params
                    )
                else:
                    prediction = client.models.predictions.create(
                        model=ref.base, input=payload, **params
                    )
                return PredictionSnapshot.from_json(prediction.dict())
            except Exception as exc:
                error = _with_cause(self._classify(exc), exc)
                maybe_created = maybe_created or _may_have_been_accepted(exc)
                if not error.retryable:
                    break
        if maybe_created:
            if adopt is not None:
                # Last look, so that a prediction started by a lost attempt is never orphaned.
                with contextlib.suppress(GenerationError):
                    adopted = adopt()
                    if adopted is not None:
                        return adopted
            cause = error or GenerationError(
                errors.PROVIDER_UNAVAILABLE, "the create's answer was lost", retryable=True
            )
            error = _with_cause(
                GenerationError(
                    cause.code,
                    f"{cause.message} (an earlier attempt may have started a prediction: it is "
                    "looked for again before anything is created)",
                    cause.retryable,
                    retry_after_s=cause.retry_after_s,
                ),
                cause,
            )
        assert error is not None
        raise error

    def lost_create_candidates(
        self,
        model_ref: str,
        payload: Mapping[str, Any],
        *,
        started_at: float,
        model_names: Collection[str] | None,
    ) -> list[PredictionSnapshot]:
        """Listed predictions a create of ``model_ref`` with ``payload``, first tried at
        ``started_at`` (epoch seconds), could have started; the nearest in time first.

        A candidate was made through the API (``source: api``; predictions made on the
        website are never ours), with an equal input, at or after ``started_at`` minus
        ``adopt_window_s`` (clock skew between us and the provider). Its model must be the
        requested version, or for an ``owner/name`` reference one of ``model_names`` (the names
        creates of this reference were answered with: the provider answers some official
        models under another name); ``None`` (no answer ever seen) matches on input and time
        alone. Whether a candidate is already owned is the caller's to check.
        """
        ref = checked_model_ref(model_ref)
        since = started_at - self.adopt_window_s
        wanted_input = _normalize_json(payload)
        names = None if model_names is None else {ref.base, *model_names}
        found: list[tuple[float, PredictionSnapshot]] = []
        for item in self.recent_predictions(since, max_pages=_ADOPT_MAX_PAGES, complete=True):
            if item.get("source", "api") != "api":
                continue
            if ref.version is not None:
                if item.get("version") != ref.version:
                    continue
            elif names is not None and not (
                isinstance(item.get("model"), str) and item["model"] in names
            ):
                continue
            if _normalize_json(item.get("input")) != wanted_input:
                continue
            created = parse_time(item.get("created_at"))
            distance = abs(created - started_at) if created is not None else float("inf")
            with contextlib.suppress(Exception):  # an entry we cannot read is nobody's to take
                found.append((distance, PredictionSnapshot.from_json(item)))
        found.sort(key=lambda pair: pair[0])
        return [snapshot for _, snapshot in found]

    def recent_predictions(
        self, since: float, *, max_pages: int | None = None, complete: bool = False
    ) -> list[dict]:
        """Predictions of the account created at or after ``since`` (epoch seconds), newest
        first, read from the list endpoint (at most ``max_pages`` pages of 100). Entries
        without a string ``id`` are left out.

        With ``complete``, a list cut short by ``max_pages`` before reaching ``since`` raises a
        retryable ``GenerationError``: a lost create that is not seen must not look absent.
        """
        out: list[dict[str, Any]] = []
        last: Mapping[str, Any] = {}
        reached_older = False
        for page in _list_pages(self, max_pages or _ADOPT_MAX_PAGES):
            last = page
            for item in page.get("results") or []:
                if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                    continue
                created = parse_time(item.get("created_at"))
                if created is not None and created < since:
                    reached_older = True  # newest first: the rest of the list is older
                    continue
                out.append(item)
            if reached_older:
                break
        if complete and not reached_older and last.get("next"):
            raise GenerationError(
                errors.PROVIDER_UNAVAILABLE,
                f"the provider's list holds more than {max_pages or _ADOPT_MAX_PAGES} pages "
                "since the create; nothing is created while a lost one may hide further down",
                retryable=True,
            )
        return out

    # ---- get / cancel -----------------------------------------------------------------------

    def get(self, prediction_id: str) -> PredictionSnapshot:
        """The current state of a prediction (transient errors retried)."""
        return self._get(prediction_id, attempts=self.request_attempts)

    def _get(self, prediction_id: str, *, attempts: int) -> PredictionSnapshot:
        try:
            data = self._request_json(
                "GET", f"/v1/predictions/{_safe_id(prediction_id)}", attempts=attempts
            )
        except GenerationError as err:
            raise _prediction_not_found(err, prediction_id)  # noqa: B904 - cause is kept
        try:
            snapshot = PredictionSnapshot.from_json(data)
        except Exception as exc:  # e.g. an error object nested too deeply to encode
            raise _with_cause(self._classify(exc), exc) from exc
        if snapshot.id != prediction_id:
            raise GenerationError(
                errors.INTERNAL_ERROR,
                f"asked for prediction {prediction_id}, the provider answered {snapshot.id}",
            )
        return snapshot

    def cancel(self, prediction_id: str) -> PredictionSnapshot:
        """Cancel a prediction; canceling one that already finished is not an error.

        Returns the prediction as the cancel (or, for a finished one, a get) left it. Cancel is
        asynchronous on Replicate: the status may still read ``processing`` right after.
        """
        path = f"/v1/predictions/{_safe_id(prediction_id)}/cancel"
        try:
            data = self._request_json("POST", path)
        except GenerationError as err:
            if err.retryable or err.code == errors.UNAUTHORIZED:
                raise
            # Some API versions refuse (409/422) to cancel a finished prediction: not our error.
            current = self.get(prediction_id)
            if current.is_terminal:
                return current
            raise _prediction_not_found(err, prediction_id)  # noqa: B904 - cause is kept
        return PredictionSnapshot.from_json(data)

    # ---- waiting ----------------------------------------------------------------------------

    def wait(
        self,
        prediction_id: str,
        *,
        deadline_s: float | None = None,
        lookup: Callable[[str], PredictionSnapshot | None] | None = None,
        expect_webhooks: bool = False,
    ) -> PredictionSnapshot:
        """Wait for one prediction; see :meth:`wait_many`."""
        return next(
            self.wait_many(
                [prediction_id],
                deadline_s=deadline_s,
                lookup=lookup,
                expect_webhooks=expect_webhooks,
            )
        )

    def wait_many(
        self,
        ids: Iterable[str],
        *,
        deadline_s: float | None = None,
        lookup: Callable[[str], PredictionSnapshot | None] | None = None,
        expect_webhooks: bool = False,
        sweep: ListSweep | None = None,
        deadlines: Mapping[str, float] | None = None,
    ) -> Iterator[PredictionSnapshot]:
        """Yield each prediction of ``ids`` once, as soon as it is terminal (in finishing order).

        One loop schedules every prediction; at most ``poll_workers`` GETs run at once, so
        hundreds of predictions need no more threads. Each prediction is polled first after
        ``poll_initial_s``, then at intervals growing x1.5 up to ``poll_max_s`` (with jitter).
        A 429 pauses all polling for its ``Retry-After``; other transient errors just delay
        that prediction's next poll.

        ``lookup(id)`` may return the state learned from a webhook (e.g. read from the
        database): a terminal snapshot is yielded without any GET. When it has nothing terminal,
        the prediction is polled at ``poll_max_s`` if ``expect_webhooks`` (the webhook should
        come first; polling is the safety net) else at the adaptive interval; ``lookup`` itself
        is consulted at the adaptive interval.

        ``sweep`` (a :class:`ListSweep` over the same ids, for when no webhooks come) is asked
        next, every ``SWEEP_LOOKUP_S``; a prediction the sweep covers needs no GET at all.

        ``deadlines`` (epoch seconds by prediction id) sets a prediction's own deadline, counted
        from when its attempt first created it, so a retried wait does not start the clock
        again. A prediction still running past its deadline (else ``deadline_s``, default: the
        resource's, after this call started) is canceled and yielded with status ``canceled``
        and ``deadline_exceeded=True``, unless the cancel shows it had already finished, in
        which case it is yielded as it is.

        A terminal error about one prediction (an unknown id, an answer that is not a
        prediction) ends only that one: it is yielded as ``failed`` with ``unreadable`` set, and
        the others are still waited for.

        Raises:
            GenerationError: an error about the whole account (unauthorized), or a prediction
                that could not be canceled at its deadline.
        """
        ordered = list(dict.fromkeys(ids))
        if not ordered:
            return
        start = time.monotonic()
        deadline_at = start + (self.deadline_s if deadline_s is None else deadline_s)
        webhook_pending = lookup is not None and expect_webhooks
        # With webhooks expected the API is the safety net: the first GET waits a full fallback
        # interval, since the webhook normally lands first.
        wall_start = time.time()
        own = deadlines or {}
        watches = {
            pid: _Watch(
                pid,
                deadline_at=start + (own[pid] - wall_start) if pid in own else deadline_at,
                interval=self.poll_initial_s,
                last_get_at=start if webhook_pending else float("-inf"),
            )
            for pid in ordered
        }
        seq = itertools.count()
        heap: list[tuple[float, int, str]] = []
        # The first look is immediate: a prediction may already be done (or known via lookup).
        for pid in ordered:
            heapq.heappush(heap, (start, next(seq), pid))
        paused_until = 0.0
        workers = min(self.poll_workers, len(ordered))
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replicate-poll")
        inflight: dict[cf.Future[PredictionSnapshot], tuple[str, str]] = {}

        def schedule(pid: str, delay: float) -> None:
            watch = watches[pid]
            due = min(time.monotonic() + delay, watch.deadline_at)
            heapq.heappush(heap, (due, next(seq), pid))

        def grow(watch: _Watch) -> float:
            delay = watch.interval * random.uniform(0.8, 1.2)
            watch.interval = min(self.poll_max_s, watch.interval * 1.5)
            return delay

        try:
            while watches:
                now = time.monotonic()
                # Launch everything that is due, within the worker budget and outside a pause.
                while (
                    heap and heap[0][0] <= now and len(inflight) < workers and now >= paused_until
                ):
                    _, _, pid = heapq.heappop(heap)
                    watch = watches[pid]
                    # A finished state from the lookup wins even past the deadline: a webhook
                    # already said how it ended, so there is nothing left to cancel.
                    known = lookup(pid) if lookup is not None else None
                    if (known is None or not known.is_terminal) and sweep is not None:
                        known = sweep(pid)
                    if known is not None and known.is_terminal:
                        del watches[pid]
                        yield _past_deadline(known, watch)
                        now = time.monotonic()
                        continue
                    if now >= watch.deadline_at:
                        inflight[pool.submit(self._cancel_at_deadline, pid)] = (pid, "cancel")
                        continue
                    if sweep is not None and sweep.covers(pid):
                        schedule(pid, SWEEP_LOOKUP_S)
                        continue
                    # Waiting for a webhook: ask the lookup (the database) at least every
                    # quarter second, the API only every webhook_fallback_s.
                    if webhook_pending and now - watch.last_get_at < self.webhook_fallback_s:
                        schedule(pid, min(grow(watch), WEBHOOK_LOOKUP_MAX_S))
                        continue
                    watch.last_get_at = now
                    inflight[pool.submit(self._get, pid, attempts=1)] = (pid, "get")

                if not watches:
                    break
                # Sleep until a request finishes or the next prediction is due.
                wake_at = heap[0][0] if heap else now + self.poll_max_s
                if len(inflight) >= workers and heap:
                    wake_at = now + self.poll_max_s  # only a finished request can free a worker
                wake_at = max(wake_at, paused_until)
                timeout = max(0.0, wake_at - time.monotonic())
                if inflight:
                    done, _ = cf.wait(inflight, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                else:
                    time.sleep(timeout)
                    done = set()

                for future in done:
                    pid, kind = inflight.pop(future)
                    watch = watches[pid]
                    try:
                        snapshot = future.result()
                    except Exception as exc:
                        err = _with_cause(self._classify(exc), exc)
                        if not err.retryable:
                            if err.code == errors.UNAUTHORIZED:
                                raise err from exc  # the account, not this prediction
                            del watches[pid]
                            yield PredictionSnapshot.unreadable_as(pid, err)
                            continue
                        if err.code == errors.RATE_LIMITED and err.retry_after_s is not None:
                            paused_until = max(paused_until, time.monotonic() + err.retry_after_s)
                        if kind == "cancel":
                            watch.cancel_failures += 1
                            if watch.cancel_failures >= self.request_attempts:
                                raise GenerationError(
                                    errors.PROVIDER_UNAVAILABLE,
                                    f"prediction {pid} passed its deadline and could not be "
                                    f"canceled: {err.message}",
                                    retryable=True,
                                ) from err
                            schedule(pid, self._backoff(watch.cancel_failures))
                        else:
                            schedule(pid, max(grow(watch), self._backoff(1, err.retry_after_s)))
                        continue
                    if kind == "cancel" or snapshot.is_terminal:
                        del watches[pid]
                        yield _past_deadline(snapshot, watch)
                        continue
                    # Without a lookup, polling is the only way to learn the result; with one, the
                    # lookup keeps the adaptive pace and the GETs are throttled above.
                    slow = expect_webhooks and lookup is None
                    schedule(pid, self.poll_max_s if slow else grow(watch))
        finally:
            # Leaving early (consumer stopped, error) must not wait for slow requests.
            pool.shutdown(wait=False, cancel_futures=True)

    def list_sweep(self, ids: Iterable[str]) -> ListSweep:
        """A :class:`ListSweep` over ``ids``: pass it to ``wait_many`` when no webhooks come."""
        return ListSweep(self, ids)

    def _cancel_at_deadline(self, prediction_id: str) -> PredictionSnapshot:
        snapshot = self.cancel(prediction_id)
        if snapshot.status in (PredictionStatus.SUCCEEDED, PredictionStatus.FAILED):
            return snapshot  # it finished before our cancel landed: report what really happened
        return dataclasses.replace(
            snapshot, status=PredictionStatus.CANCELED, deadline_exceeded=True
        )


def _past_deadline(snapshot: PredictionSnapshot, watch: _Watch) -> PredictionSnapshot:
    """A prediction canceled once its deadline had passed was canceled for it, whoever did it:
    the provider's own ``Cancel-After`` stops one whose waiting run was gone at the time."""
    if (
        snapshot.status in (PredictionStatus.CANCELED, PredictionStatus.ABORTED)
        and not snapshot.deadline_exceeded
        and time.monotonic() >= watch.deadline_at
    ):
        return dataclasses.replace(snapshot, deadline_exceeded=True)
    return snapshot


def _with_cause(err: GenerationError, cause: BaseException) -> GenerationError:
    """Chain ``cause`` to ``err`` unless they are the same exception (no self-cycles)."""
    if err is not cause:
        err.__cause__ = cause
    return err


def _safe_id(prediction_id: str) -> str:
    """Refuse ids that could change the request path (they come from databases and webhooks)."""
    if not re.fullmatch(r"[0-9A-Za-z_-]+", prediction_id or ""):
        raise GenerationError(errors.INTERNAL_ERROR, f"invalid prediction id {prediction_id!r}")
    return prediction_id


def _prediction_not_found(err: GenerationError, prediction_id: str) -> GenerationError:
    # For prediction paths a 404 means the prediction, not a model: say so.
    if err.code == errors.MODEL_NOT_FOUND:
        mapped = GenerationError(
            errors.INTERNAL_ERROR, f"Replicate does not know prediction {prediction_id}"
        )
        mapped.__cause__ = err
        return mapped
    return err


def _list_pages(
    resource: ReplicateResource, max_pages: int, *, attempts: int | None = None
) -> Iterator[dict[str, Any]]:
    """Pages of ``GET /v1/predictions``, newest first, following ``next`` (never to another host)
    for at most ``max_pages``. The caller stops early by leaving the loop."""
    path = "/v1/predictions"
    for _ in range(max_pages):
        page = resource._request_json("GET", path, attempts=attempts)
        yield page
        next_page = page.get("next")
        if not next_page:
            return
        path = _cursor_path(str(next_page), resource.base_url)


def _cursor_path(url: str, base_url: str) -> str:
    """A pagination cursor to request, never pointing at a host other than ``base_url``.

    A cursor is a full URL chosen by the server; following one to another host would send it
    the token. A foreign origin (e.g. a proxy's public name) keeps only its path and query.
    """
    parts, base = urlsplit(url), urlsplit(base_url)
    if (parts.scheme, parts.netloc) == (base.scheme, base.netloc) or not parts.netloc:
        return url
    return parts.path + (f"?{parts.query}" if parts.query else "")
