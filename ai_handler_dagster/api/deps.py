"""What routes depend on: the app's database engine and price book, and the calling key.

``require(scope)`` is the dependency of every authenticated route: it reads the bearer key,
checks it, counts the request against the key's per-minute limit and checks its scope. The
check and the count are the worker's ``admitter``'s: the keys presented meanwhile, checked and
counted together (one statement on PostgreSQL, ``ratelimit.admit_many``). Missing, malformed,
unknown or revoked keys are 401; a key without the scope 403 (the request counts); over its
limit 429 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ai_handler_dagster import settings
from ai_handler_dagster.api import batching, keys, ratelimit, tokens
from ai_handler_dagster.api.problems import (
    FORBIDDEN_SCOPE,
    FOREIGN_USER,
    INVALID_TOKEN,
    RATE_LIMITED,
    UNAUTHORIZED,
    Problem,
)
from ai_handler_dagster.pricing import PriceBook

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer aih_...`")


def engine_of(request: Request) -> sa.Engine:
    """The app database's engine (one per worker)."""
    value: sa.Engine = request.app.state.engine
    return value


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency in its thread pool, a thread hop per request for reading an attribute.


async def engine(request: Request) -> sa.Engine:
    """The app database's engine (one per worker)."""
    return engine_of(request)


async def counter_engine(request: Request) -> sa.Engine:
    """The engine of key checks and request counts (autocommit)."""
    value: sa.Engine = request.app.state.counter_engine
    return value


async def prices(request: Request) -> PriceBook:
    """The price book the worker loaded at start."""
    value: PriceBook = request.app.state.prices
    return value


def admitter(counter: sa.Engine) -> batching.Batcher[str, ratelimit.Admission]:
    """The worker's key checks: the presented keys that queued meanwhile checked and counted
    with one statement (``ratelimit.admit_many``) on the counter engine, whose connections
    autocommit, so a key's counter row stays locked only while that statement runs."""

    def run(presented: Sequence[str]) -> list[ratelimit.Admission]:
        with counter.connect() as connection:
            answers = ratelimit.admit_many(
                connection, presented, default_limit=settings.api_rate_per_minute()
            )
            connection.commit()  # SQLite's transaction; nothing to do in autocommit
        return answers

    return batching.Batcher(run, name="admitter")


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ai-handler"'}


async def _admit_key(request: Request, presented: str, scope: str, any_scope: bool) -> keys.Caller:
    admit: batching.Batcher[str, ratelimit.Admission] = request.app.state.admitter
    admission = await admit(presented)
    found, verdict = admission.caller, admission.verdict
    if found is None or verdict is None:
        raise Problem(UNAUTHORIZED, "the API key is unknown or revoked", headers=_CHALLENGE)
    if not any_scope and not found.has(scope):
        raise Problem(
            FORBIDDEN_SCOPE,
            f"the key {found.key_id} lacks the '{scope}' scope",
            required_scope=scope,
        )
    _check_rate(found, verdict)
    request.state.caller = found
    return found


def _check_rate(found: keys.Caller, verdict: ratelimit.Verdict) -> None:
    if not verdict.allowed:
        raise Problem(
            RATE_LIMITED,
            f"the key {found.key_id} made more than {verdict.limit} requests this minute",
            headers={"Retry-After": str(verdict.retry_after_s)},
            limit_per_minute=verdict.limit,
        )


def require(scope: str, *, any_scope: bool = False) -> Callable[..., Awaitable[keys.Caller]]:
    """The dependency that admits a key with ``scope`` (``admin`` has every scope); with
    ``any_scope`` every valid key is admitted."""
    if scope not in keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def caller(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> keys.Caller:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(
                UNAUTHORIZED, "no API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE
            )
        if tokens.looks_like_token(credentials.credentials):
            raise Problem(
                FORBIDDEN_SCOPE,
                f"a user token only reads; this request needs an API key with the '{scope}' scope",
                required_scope=scope,
            )
        return await _admit_key(request, credentials.credentials, scope, any_scope)

    return caller


@dataclass(frozen=True)
class Reader:
    """Who reads: an API key with the ``read`` scope (every user) or a user token (``user``)."""

    caller: keys.Caller
    user: str | None

    def check_user(self, user: str) -> None:
        """Refuse (403) a user token reading another user's data."""
        if self.user is not None and self.user != user:
            raise Problem(FOREIGN_USER, "the user token is for another user")


def _admit_token(counter: sa.Engine, presented: str) -> tuple[tokens.Holder, ratelimit.Verdict]:
    with counter.connect() as connection:
        holder = tokens.verify(connection, presented)
        limit = holder.key.rate_per_minute or settings.api_rate_per_minute()
        verdict = ratelimit.count_request(connection, holder.key.key_id, limit)
        connection.commit()
    return holder, verdict


async def reader(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    access_token: str | None = Query(
        None,
        max_length=4096,
        description="A user token (POST /v1/tokens), for clients that cannot send a header "
        "(a browser's EventSource). The Authorization header takes precedence.",
    ),
) -> Reader:
    """The dependency of the read routes: an API key with the ``read`` scope, or a user token
    (read-only, one user) in the ``Authorization`` header or the ``access_token`` parameter."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        presented = credentials.credentials
    elif access_token:
        presented = access_token
    else:
        raise Problem(
            UNAUTHORIZED,
            "no API key or user token: send 'Authorization: Bearer <key or token>'",
            headers=_CHALLENGE,
        )
    if not tokens.looks_like_token(presented):
        return Reader(await _admit_key(request, presented, keys.READ, False), None)
    try:
        holder, verdict = await run_in_threadpool(
            _admit_token, request.app.state.counter_engine, presented
        )
    except tokens.TokenRefused as exc:
        raise Problem(INVALID_TOKEN, str(exc), headers=_CHALLENGE) from exc
    _check_rate(holder.key, verdict)
    request.state.caller = holder.key
    return Reader(holder.key, holder.user)
