"""The Replicate client: create predictions without paying twice, get, cancel and list them.

Everything goes through the official ``replicate`` client (its auth, base URL, timeouts and its own
GET retries on 429/503/504). :class:`ReplicateClient` adds what the client leaves to its callers:

* **Safe create retries.** The client never retries a POST, and Replicate has no idempotency key.
  :meth:`ReplicateClient.create` retries throttling, 5xx, timeouts and dropped connections, and
  before each retry after a response that may have been lost it looks for the prediction the lost
  attempt created and *adopts* it, so one generation never pays for two predictions.
* **One pace for every create.** ``create`` takes a :class:`CreatePacer` (the app's shared
  throttle, ``throttle.py``): it waits for its turn before each try and reports each answer's
  status and ``ratelimit-*`` headers. Under a pacer a 429 spends none of the create's attempts:
  the pacer makes every create wait, this one included.
* **A provider-side deadline.** Every create carries ``Cancel-After`` (``cancel_after_s``), so a
  prediction stops even when the process that should cancel it has died.
* **Raw reads.** The client's ``Prediction`` model drops fields that decide what happens to money
  (see ``snapshot.py``), so reads (get, list, cancel) use the client's request method and keep
  the raw JSON.

Every failure is a :class:`~ai_handler_dagster.errors.GenerationError` (``failures.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import replicate

from ai_handler_dagster import errors, retries
from ai_handler_dagster.domain import InvalidModelRef, ModelRef, parse_model_ref
from ai_handler_dagster.errors import RATE_LIMITED, GenerationError
from ai_handler_dagster.replicate.failures import (
    _may_have_been_accepted,
    _raise_problem,
    _redacted,
    _with_cause,
    classify,
)
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, parse_time

#: Pages of ``GET /v1/predictions`` (100 each) scanned when looking for a lost create: a few
#: minutes of an account creating at Replicate's limit of about 600 a minute.
_ADOPT_MAX_PAGES = 50


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


class CreatePacer(Protocol):
    """The shared pace of creates (``throttle.Pacer``): a turn before each create, and every
    create's answer (its status and headers) to learn from."""

    def wait_turn(self) -> None:
        """Block until this create may go; raise a ``GenerationError`` to give up."""

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        """The answer of a create request (201, a 429, any error with its headers)."""

    def unused(self) -> None:
        """The turn ``wait_turn`` just granted was not used: no create was sent."""


#: Where the response hook reports the answers of the create running in this thread.
_ANSWERS: contextvars.ContextVar[list[tuple[int, dict[str, str]]] | None] = contextvars.ContextVar(
    "ai_handler_create_answers", default=None
)


def _note_answer(response: httpx.Response) -> None:
    """httpx response hook: keep the status and headers of a create's answer for its pacer
    (the official client returns only the parsed prediction). Runs before :func:`_raise_problem`
    turns an error answer into an exception."""
    answers = _ANSWERS.get()
    if answers is not None:
        answers.append((response.status_code, {k.lower(): v for k, v in response.headers.items()}))


@contextlib.contextmanager
def _answers() -> Iterator[list[tuple[int, dict[str, str]]]]:
    seen: list[tuple[int, dict[str, str]]] = []
    token = _ANSWERS.set(seen)
    try:
        yield seen
    finally:
        _ANSWERS.reset(token)


_ClientKey = tuple[str, str, float, float | None]
_CLIENTS: dict[_ClientKey, replicate.Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(
    base_url: str, token: str, timeout_s: float, cancel_after_s: float | None
) -> replicate.Client:
    """One client (one connection pool) per endpoint, token and settings, shared by threads.

    A :class:`ReplicateClient` is built wherever it is needed (each ``get_client()`` of the
    Dagster resource), so the client lives in a module cache; the key holds a hash of the token,
    never the token itself.
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
                    "response": [_note_answer, _raise_problem],
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


#: How a listed prediction relates to a reference (:func:`listed_match`).
MATCH, INDISTINCT, OTHER = "match", "indistinct", "other"


def listed_match(
    ref: ModelRef, item: Mapping[str, Any], model_names: Collection[str] | None
) -> str:
    """Whether a listed prediction could have been made by a create of ``ref`` (its input,
    source and time aside): ``match``, ``other``, or for a deployment ``indistinct``.

    A prediction made through a deployment names it (``deployment: "owner/name"``) and reports
    the model and version the deployment ran, as a plain create of that model would; one made
    any other way names none. So an entry that names a deployment is never a model
    reference's, and one that names another deployment never this deployment's. An entry that
    names none may still be this deployment's if the provider left the field out of its list:
    it cannot be told apart from the plain model's (or another application's) prediction of
    the same input, and is ``indistinct``, unless the deployment's creates were answered under
    other model names (``model_names``), which rules it out.

    For a model reference: the requested version, else the reference's name or one of
    ``model_names`` (``None``: no answer seen yet, any name).
    """
    named = item.get("deployment")
    named = named if isinstance(named, str) and named else None
    model = item.get("model")
    if ref.deployment:
        if named is not None:
            # "owner/name"; a bare "name" too, in case the API ever leaves the owner out (the
            # list holds only the account's own predictions, so the name is the account's).
            return MATCH if named in (ref.path, ref.name) else OTHER
        if model_names is not None and not (isinstance(model, str) and model in model_names):
            return OTHER
        return INDISTINCT
    if named is not None:
        return OTHER
    if ref.version is not None:
        return MATCH if item.get("version") == ref.version else OTHER
    if model_names is None:
        return MATCH
    return MATCH if isinstance(model, str) and model in {ref.base, *model_names} else OTHER


@dataclass(frozen=True)
class LostCreateSearch:
    """What :meth:`ReplicateClient.lost_create_search` found, each list nearest in time first.

    ``candidates`` may be taken. ``indistinct`` are predictions a lost deployment create may
    have made that do not say so (the entry names no deployment): never taken, since they may
    be someone else's, and while one is unowned nothing may be created either, since it may be
    ours (the caller fails the attempt instead).
    """

    candidates: list[PredictionSnapshot]
    indistinct: list[PredictionSnapshot] = field(default_factory=list)


@dataclass(frozen=True)
class ReplicateSettings:
    """How to reach Replicate and how patiently; the Dagster resource's config fields, which
    describe each one (``resources/replicate.py``)."""

    api_token: str | None = field(default=None, repr=False)
    base_url: str = "https://api.replicate.com"
    timeout_s: float = 30.0
    create_attempts: int = 5
    request_attempts: int = 5
    retry_backoff_s: float = 0.5
    poll_initial_s: float = 0.5
    poll_max_s: float = 10.0
    webhook_fallback_s: float = 30.0
    deadline_s: float = 1800.0
    cancel_after_s: float | None = 2400.0
    adopt_window_s: float = 10.0
    poll_workers: int = 8


class ReplicateClient:
    """Creates, gets and cancels Replicate predictions; every failure is a GenerationError.

    Thread-safe: all methods may be called from many threads; they share one HTTP connection
    pool per (base URL, token). Building one is cheap (no connection is made, and a missing
    token fails the first request, as unauthorized). Waiting is ``waiting.py``'s.
    """

    def __init__(self, settings: ReplicateSettings) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"ReplicateClient(base_url={self.settings.base_url!r})"

    # ---- plumbing ---------------------------------------------------------------------------

    def _client(self, cancel_after_s: float | None = None) -> replicate.Client:
        if not self.settings.api_token:
            raise GenerationError(errors.UNAUTHORIZED, "no Replicate API token is configured")
        return _shared_client(
            self.settings.base_url.rstrip("/"),
            self.settings.api_token,
            self.settings.timeout_s,
            self.settings.cancel_after_s if cancel_after_s is None else cancel_after_s,
        )

    def classify(self, exc: BaseException) -> GenerationError:
        """:func:`~ai_handler_dagster.replicate.failures.classify`, with this client's token
        redacted from the message."""
        return _redacted(classify(exc), self.settings.api_token or "")

    def _request_json(
        self, method: str, path: str, *, attempts: int | None = None
    ) -> dict[str, Any]:
        """One idempotent request (GET, cancel) with retries of transient errors (the project's
        policy, ``retries.py``: up to ``attempts`` tries, default ``request_attempts``); raw
        JSON."""
        client = self._client()

        def once() -> dict[str, Any]:
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
                raise _with_cause(self.classify(exc), exc)  # noqa: B904 - the cause is set

        policy = retries.retrying(
            attempts=attempts or self.settings.request_attempts,
            base_s=self.settings.retry_backoff_s,
        )
        return policy(once)

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
        pacer: CreatePacer | None = None,
    ) -> PredictionSnapshot:
        """Start a prediction of ``model_ref``: ``owner/name`` (the model's endpoint),
        ``owner/name:version`` (by version) or ``deployment:owner/name`` (the deployment's
        endpoint; its answer names the model and version the deployment runs).

        Transient failures are retried up to ``create_attempts`` times with backoff (429 waits
        ``Retry-After``). When an attempt's answer was lost after the server may have accepted
        it (timeout, dropped connection, 5xx), every later attempt first calls ``adopt()``,
        which looks for the prediction the lost attempt created (see
        :meth:`lost_create_candidates`) and returns it, made this caller's own, or None. While
        ``adopt`` raises, nothing is created. Without ``adopt`` a lost answer is never retried
        blindly: the error is raised.

        ``maybe_created`` makes the very first attempt call ``adopt()`` before creating: pass it
        when this attempt may already have called ``create`` (an op retry, a resumed run).

        ``cancel_after_s`` replaces the settings' ``Cancel-After`` for this create (a model's
        own deadline, see ``lifetimes.py``). ``before_try()`` is called right before each
        create request (to note that an answer is in flight).

        With a ``pacer``, every create request first waits for its turn (``wait_turn``, which
        may raise to give up: the queue deadline) and reports its answer; a 429 is then not
        counted against ``create_attempts`` and is not backed off here (the pacer holds every
        create back for its ``Retry-After``). A failed ``adopt()`` is always an attempt, backed
        off. Giving up at the queue deadline after a lost answer takes the same last look as
        every other error; a turn granted but not used (``before_try`` raised) is handed back.

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
        attempt = 0
        throttled = False  # the last create was answered 429 under a pacer
        while throttled or attempt < self.settings.create_attempts:
            if not throttled:
                attempt += 1  # under a pacer, a 429 spends no attempt: the wait is the pacer's
            if error is not None and not throttled:
                # Not tenacity's loop: adoption runs between tries, and a lost answer changes
                # what the next try does. The wait is the project's policy all the same.
                time.sleep(
                    retries.backoff_s(
                        attempt - 1,
                        base_s=self.settings.retry_backoff_s,
                        retry_after_s=error.retry_after_s,
                    )
                )
            if maybe_created:
                if adopt is None:
                    break
                try:
                    adopted = adopt()
                except GenerationError as exc:  # the list could not be read: nothing is created
                    error = exc
                    # An attempt, backed off: after a 429 a failing look must not loop at once,
                    # never reaching the pacer's queue deadline or its stop.
                    throttled = False
                    if not exc.retryable:
                        break
                    continue
                if adopted is not None:
                    return adopted
            if pacer is not None:
                try:
                    pacer.wait_turn()
                except GenerationError as exc:  # the queue deadline
                    if not maybe_created:
                        raise
                    error = exc  # a lost create's prediction gets its last look below
                    break
            if before_try is not None:
                try:
                    before_try()
                except BaseException:
                    if pacer is not None:
                        # Nothing was sent: the turn is someone else's. The original error
                        # matters more than a failed return.
                        with contextlib.suppress(Exception):
                            pacer.unused()
                    raise
            throttled = False
            snapshot: PredictionSnapshot | None = None
            with _answers() as answers:
                try:
                    if ref.deployment:
                        prediction = client.deployments.predictions.create(
                            ref.path, input=payload, **params
                        )
                    elif ref.version is not None:
                        prediction = client.predictions.create(
                            version=ref.version, input=payload, **params
                        )
                    else:
                        prediction = client.models.predictions.create(
                            model=ref.base, input=payload, **params
                        )
                    snapshot = PredictionSnapshot.from_json(prediction.dict())
                except Exception as exc:
                    error = _with_cause(self.classify(exc), exc)
                    maybe_created = maybe_created or _may_have_been_accepted(exc)
            if pacer is not None and answers:
                if snapshot is not None:
                    # The prediction is made: what the answer teaches the pacer cannot undo it.
                    with contextlib.suppress(Exception):
                        pacer.answered(*answers[-1])
                    return snapshot
                pacer.answered(*answers[-1])
            if snapshot is not None:
                return snapshot
            assert error is not None
            throttled = pacer is not None and error.code == RATE_LIMITED
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
        """The candidates of :meth:`lost_create_search` (what a lost create could have made)."""
        return self.lost_create_search(
            model_ref, payload, started_at=started_at, model_names=model_names
        ).candidates

    def lost_create_search(
        self,
        model_ref: str,
        payload: Mapping[str, Any],
        *,
        started_at: float,
        model_names: Collection[str] | None,
    ) -> LostCreateSearch:
        """Listed predictions a create of ``model_ref`` with ``payload``, first tried at
        ``started_at`` (epoch seconds), could have started; the nearest in time first.

        A candidate was made through the API (``source: api``; predictions made on the
        website are never ours), with an equal input, at or after ``started_at`` minus
        ``adopt_window_s`` (clock skew between us and the provider), and its model is the one
        asked for (:func:`listed_match`): the requested version; for an ``owner/name``
        reference one of ``model_names`` (the names creates of this reference were answered
        with: the provider answers some official models under another name), ``None`` (no
        answer ever seen) matching on input and time alone; for a deployment, the deployment's
        name in the entry's ``deployment`` field. Entries that could be a deployment's but do
        not name one are ``indistinct`` (see :class:`LostCreateSearch`). Whether a candidate is
        already owned is the caller's to check.
        """
        ref = checked_model_ref(model_ref)
        since = started_at - self.settings.adopt_window_s
        wanted_input = _normalize_json(payload)
        names = None if model_names is None else set(model_names)
        found: dict[str, list[tuple[float, PredictionSnapshot]]] = {MATCH: [], INDISTINCT: []}
        for item in self.recent_predictions(since, max_pages=_ADOPT_MAX_PAGES, complete=True):
            if item.get("source", "api") != "api":
                continue
            verdict = listed_match(ref, item, names)
            if verdict == OTHER:
                continue
            if _normalize_json(item.get("input")) != wanted_input:
                continue
            created = parse_time(item.get("created_at"))
            distance = abs(created - started_at) if created is not None else float("inf")
            with contextlib.suppress(Exception):  # an entry we cannot read is nobody's to take
                found[verdict].append((distance, PredictionSnapshot.from_json(item)))
        for pairs in found.values():
            pairs.sort(key=lambda pair: pair[0])
        return LostCreateSearch(
            candidates=[snapshot for _, snapshot in found[MATCH]],
            indistinct=[snapshot for _, snapshot in found[INDISTINCT]],
        )

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
        for page in self.list_pages(max_pages or _ADOPT_MAX_PAGES):
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

    def get(self, prediction_id: str, *, attempts: int | None = None) -> PredictionSnapshot:
        """The current state of a prediction (transient errors retried, up to ``attempts``;
        default ``request_attempts``)."""
        try:
            data = self._request_json(
                "GET", f"/v1/predictions/{_safe_id(prediction_id)}", attempts=attempts
            )
        except GenerationError as err:
            raise _prediction_not_found(err, prediction_id)  # noqa: B904 - cause is kept
        try:
            snapshot = PredictionSnapshot.from_json(data)
        except Exception as exc:  # e.g. an error object nested too deeply to encode
            raise _with_cause(self.classify(exc), exc) from exc
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

    def list_pages(
        self, max_pages: int, *, attempts: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Pages of ``GET /v1/predictions``, newest first, following ``next`` (never to another
        host) for at most ``max_pages``. The caller stops early by leaving the loop."""
        path = "/v1/predictions"
        for _ in range(max_pages):
            page = self._request_json("GET", path, attempts=attempts)
            yield page
            next_page = page.get("next")
            if not next_page:
                return
            path = _cursor_path(str(next_page), self.settings.base_url)


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


def _cursor_path(url: str, base_url: str) -> str:
    """A pagination cursor to request, never pointing at a host other than ``base_url``.

    A cursor is a full URL chosen by the server; following one to another host would send it
    the token. A foreign origin (e.g. a proxy's public name) keeps only its path and query.
    """
    parts, base = urlsplit(url), urlsplit(base_url)
    if (parts.scheme, parts.netloc) == (base.scheme, base.netloc) or not parts.netloc:
        return url
    return parts.path + (f"?{parts.query}" if parts.query else "")
