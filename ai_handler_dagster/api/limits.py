"""Limits that keep one slow or oversized client from exhausting the service.

:class:`BodyLimits` is an ASGI middleware that reads each request's body before the app sees it:
a ``Content-Length`` over the limit is refused at once (413) without reading, a body that grows
over it while streaming is cut off (413), and a body that has not fully arrived within the
timeout is refused (408). The app then gets the body in one piece; later ``receive`` calls go to
the server (a stream still learns of a disconnect). Bodies here are small JSON documents, so
reading them whole costs nothing. Other limits are the server's: uvicorn's
``limit_concurrency`` (503 past it), its keep-alive timeout, and h11's header size limit
(``ai-handler serve``).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai_handler_dagster.api.problems import (
    BODY_TOO_LARGE,
    INTERNAL,
    INVALID_REQUEST,
    REQUEST_TIMEOUT,
    Problem,
)
from ai_handler_dagster.domain import InvalidText, check_text

log = logging.getLogger(__name__)


class BodyLimits:
    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unclean = _unclean_target(scope)
        if unclean is not None:
            field, why = unclean
            problem = Problem(
                INVALID_REQUEST, f"{field}: {why}", errors=[{"field": field, "message": why}]
            )
            await self._refuse(problem, scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(
                Problem(BODY_TOO_LARGE, f"the body is {declared} bytes; at most {self.max_bytes}"),
                scope,
                receive,
                send,
            )
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await self._refuse(
                    Problem(
                        REQUEST_TIMEOUT,
                        f"the body did not arrive within {self.timeout_s:g} seconds",
                    ),
                    scope,
                    receive,
                    send,
                )
                return
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(
                    Problem(BODY_TOO_LARGE, f"the body is over {self.max_bytes} bytes"),
                    scope,
                    receive,
                    send,
                )
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return whole
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(problem: Problem, scope: Scope, receive: Receive, send: Send) -> None:
        # The rest of the body is not read: the connection cannot carry another request.
        response = problem.response(scope.get("path"))
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _unclean_target(scope: Scope) -> tuple[str, str] | None:
    """The path or a query parameter holding text no route accepts (a NUL, a control
    character, a lone surrogate), as ``(field, message)``; None when the target is clean. Such
    text can reach no identifier, and PostgreSQL refuses a NUL outright, so it is refused here,
    once, for every route."""
    try:
        check_text(scope.get("path", ""), "path", error=InvalidText)
        raw = scope.get("query_string", b"").decode("utf-8", errors="surrogateescape")
        for name, value in parse_qsl(raw, keep_blank_values=True, errors="surrogateescape"):
            check_text(name, "query", error=InvalidText)
            check_text(value, f"query.{name}", error=InvalidText)
    except InvalidText as exc:
        where, _, message = str(exc).partition(" ")
        return where, message
    return None


class CatchAll:
    """Answers an unexpected failure with a 500 problem itself (and logs it), instead of letting
    it reach Starlette's outermost error handler, which answers and then re-raises it: the server
    would then drop the connection, failing the client's next request on it too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope["path"])
            if started:
                raise  # half an answer is out: only closing the connection tells the client
            response = Problem(INTERNAL, "the service failed to answer").response(scope["path"])
            await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
