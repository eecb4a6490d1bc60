"""Errors of the HTTP API as RFC 9457 problem details (``application/problem+json``).

Every refusal is a :class:`Problem` with a stable ``type``: a relative URI, ``/problems/<slug>``,
that the service itself answers with the problem's description (``GET /problems/{slug}``), so a
client can branch on ``type`` and a person can look it up. ``title`` is the same for every
occurrence of a type; ``detail`` says what was wrong with this request. Extra members (``errors``
for the offending fields, ``available``/``needed`` for credits) are documented per type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from ai_handler_dagster.errors import AiHandlerError

MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    """One kind of problem: its slug (the end of its ``type`` URI), HTTP status, title and a
    description for ``GET /problems/{slug}``."""

    slug: str
    status: int
    title: str
    description: str

    @property
    def uri(self) -> str:
        return f"/problems/{self.slug}"


TYPES: dict[str, ProblemType] = {}


def problem_type(slug: str, status: int, title: str, description: str) -> ProblemType:
    """Register a problem type (once per slug) and return it."""
    if slug in TYPES:
        raise ValueError(f"problem type {slug!r} is registered twice")
    TYPES[slug] = ProblemType(slug, status, title, description)
    return TYPES[slug]


UNAUTHORIZED = problem_type(
    "unauthorized",
    401,
    "Missing or unknown API key",
    "Send an API key as 'Authorization: Bearer <key>'. Keys are created by the operator with "
    "`ai-handler keys create`; a revoked key is refused like an unknown one.",
)
FORBIDDEN_SCOPE = problem_type(
    "forbidden-scope",
    403,
    "The API key lacks the scope this request needs",
    "Each route needs a scope (read, submit or admin); the key's scopes are set when it is "
    "created. 'required_scope' names the missing one.",
)
RATE_LIMITED = problem_type(
    "rate-limited",
    429,
    "Too many requests for this API key",
    "Each key may make a number of requests a minute (AI_HANDLER_API_RATE_PER_MIN, or the key's "
    "own limit). Retry after the number of seconds in the Retry-After header.",
)
INVALID_TOKEN = problem_type(
    "invalid-token",
    401,
    "The user token is not valid",
    "User tokens (POST /v1/tokens) are short-lived and read-only. This one is malformed, "
    "expired, or its API key was revoked: ask the application's backend for a new one.",
)
FOREIGN_USER = problem_type(
    "foreign-user",
    403,
    "The user token is for another user",
    "A user token reads only its own user's generations, credits and events.",
)
NOT_FOUND = problem_type("not-found", 404, "Not found", "No resource at this URL.")
METHOD_NOT_ALLOWED = problem_type(
    "method-not-allowed", 405, "Method not allowed", "This URL does not accept this method."
)
INVALID_REQUEST = problem_type(
    "invalid-request",
    422,
    "The request is malformed",
    "The body or parameters do not have the expected shape or values. 'errors' lists each "
    "offending field ('field': a dotted path, 'message': what is wrong). Nothing was written.",
)
BODY_TOO_LARGE = problem_type(
    "body-too-large",
    413,
    "The request body is too large",
    "Bodies are limited to AI_HANDLER_API_MAX_BODY_BYTES bytes. Nothing was read further.",
)
REQUEST_TIMEOUT = problem_type(
    "request-timeout",
    408,
    "The request body arrived too slowly",
    "A request's body must arrive within AI_HANDLER_API_BODY_TIMEOUT_S seconds.",
)
INTERNAL = problem_type(
    "internal-error",
    500,
    "Internal error",
    "The service failed to answer; nothing was written by this request. The log has details.",
)
UNAVAILABLE = problem_type(
    "unavailable",
    503,
    "Service unavailable",
    "A dependency (the database) is unreachable. Retry later.",
)


class Problem(AiHandlerError):
    """A refusal to send as problem details: its type, the detail for this occurrence, extra
    members and extra headers (``Retry-After``, ``WWW-Authenticate``)."""

    def __init__(
        self,
        kind: ProblemType,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.kind.uri,
            "title": self.kind.title,
            "status": self.kind.status,
            "detail": self.detail,
        }
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out

    def response(self, instance: str | None = None) -> JSONResponse:
        return JSONResponse(
            self.body(instance),
            status_code=self.kind.status,
            headers=self.headers,
            media_type=MEDIA_TYPE,
        )


def describe(slug: str) -> dict[str, Any] | None:
    """What ``GET /problems/{slug}`` answers, or None for an unknown slug."""
    kind = TYPES.get(slug)
    if kind is None:
        return None
    return {
        "type": kind.uri,
        "title": kind.title,
        "status": kind.status,
        "description": kind.description,
    }
