"""The emulator's HTTP face: Replicate's API routes, output files and ``/_emulator`` controls.

A stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive (the official client pools
connections). Request threads only parse, call :class:`Engine` and write; they block only for
``Prefer: wait``. Every ``/v1`` exchange goes through the same gate in this order: count it,
authenticate, injected 500, rate limit, injected 429, then the route itself.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from .config import EmulatorConfig
from .engine import ApiError, Engine, model_for, not_found, validation_error
from .http import BodyTooLarge, LocalHTTPServer, TrackedHandler
from .models import MODELS, VERSIONS, DemoModel
from .ratelimit import Budget, TokenBucket
from .webhooks import WEBHOOK_EVENTS

log = logging.getLogger(__name__)

MAX_WAIT_S = 60
MAX_BODY_BYTES = 10 * 1024 * 1024


class DropConnection(Exception):
    """Close the connection without answering (the ``drop_create`` fault)."""


@dataclass
class Request:
    """What a route handler needs from an HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # http.client.HTTPMessage: case-insensitive .get()
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (empty body = ``{}``); 400 on malformed JSON."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            raise ApiError(400, "Bad request", "The request body is not valid JSON.") from None

    def arg(self, name: str) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    """An HTTP answer."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, doc: Any, headers: dict[str, str] | None = None) -> Response:
        """A JSON answer."""
        body = json.dumps(doc, separators=(",", ":")).encode()
        return cls(status, body, "application/json", headers or {})

    @classmethod
    def problem(cls, error: ApiError) -> Response:
        """An ``application/problem+json`` answer."""
        body = json.dumps(error.body(), separators=(",", ":")).encode()
        return cls(error.status, body, "application/problem+json", dict(error.headers))


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path pattern, the label counted in stats, and its gate."""

    method: str
    pattern: re.Pattern[str]
    label: str
    handler: str
    kind: str = "api"  # api (auth, faults, rate limit) | file (500 fault only) | open
    creates: bool = False
    throttle_fault: bool = False  # the injected 429 applies (creates and gets)


def _route(method: str, template: str, handler: str, **kw: Any) -> Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    if template.startswith("/files/"):
        regex = r"/files/(?P<id>[^/]+)/(?P<index>\d+)\.(?P<ext>\w+)"
    return Route(method, re.compile(f"^{regex}$"), f"{method} {template}", handler, **kw)


ROUTES: tuple[Route, ...] = (
    _route("POST", "/v1/predictions", "create", creates=True, throttle_fault=True),
    _route("GET", "/v1/predictions", "list_predictions"),
    _route("GET", "/v1/predictions/{id}", "get_prediction", throttle_fault=True),
    _route("POST", "/v1/predictions/{id}/cancel", "cancel"),
    _route(
        "POST",
        "/v1/models/{owner}/{name}/predictions",
        "create_for_model",
        creates=True,
        throttle_fault=True,
    ),
    _route(
        "POST",
        "/v1/deployments/{owner}/{name}/predictions",
        "create_for_deployment",
        creates=True,
        throttle_fault=True,
    ),
    _route("GET", "/v1/deployments", "list_deployments"),
    _route("GET", "/v1/deployments/{owner}/{name}", "get_deployment"),
    _route("GET", "/v1/models", "list_models"),
    _route("GET", "/v1/models/{owner}/{name}", "get_model"),
    _route("GET", "/v1/models/{owner}/{name}/versions", "list_versions"),
    _route("GET", "/v1/models/{owner}/{name}/versions/{version}", "get_version"),
    _route("GET", "/v1/webhooks/default/secret", "webhook_secret"),
    _route("GET", "/v1/account", "account"),
    _route("GET", "/files/{id}/{index}.{ext}", "output_file", kind="file"),
    _route("GET", "/p/{id}", "web_page", kind="open"),
    _route("GET", "/_emulator/health", "control_health", kind="open"),
    _route("GET", "/_emulator/stats", "control_stats", kind="open"),
    _route("GET", "/_emulator/predictions", "control_predictions", kind="open"),
    _route("GET", "/_emulator/config", "control_config", kind="open"),
    _route("POST", "/_emulator/config", "control_configure", kind="open"),
    _route("POST", "/_emulator/expire", "control_expire", kind="open"),
    _route("POST", "/_emulator/web_predictions", "control_web_prediction", kind="open"),
)


def parse_prefer_wait(header: str | None) -> float | None:
    """Seconds asked for by ``Prefer: wait`` / ``Prefer: wait=N`` (clamped to 1..60)."""
    if not header:
        return None
    for part in header.split(","):
        token = part.strip().lower()
        if token == "wait":
            return float(MAX_WAIT_S)
        if token.startswith("wait="):
            try:
                return float(min(MAX_WAIT_S, max(1, int(token[5:]))))
            except ValueError:
                raise ApiError(400, "Bad request", f"Invalid Prefer header: {header}") from None
    return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A ``Cancel-After`` value: Go-style (``90s``, ``1m30s``, ``500ms``) or bare seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, "Bad request", f"Invalid Cancel-After duration: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _parse_time(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ApiError(400, "Bad request", f"{name} must be an ISO 8601 timestamp") from None


class App:
    """Routes requests to the engine and renders answers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        cfg = engine.config
        self._create_bucket = TokenBucket(cfg.creates_per_minute, cfg.creates_burst)
        self._other_bucket = TokenBucket(cfg.requests_per_minute, cfg.requests_burst)

    # ------------------------------------------------------------------------ dispatch

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """The route for a request, its path parameters, and whether the path exists at all."""
        lookup = "GET" if method == "HEAD" else method
        path_known = False
        for route in ROUTES:
            m = route.pattern.match(path)
            if m:
                path_known = True
                if route.method == lookup:
                    return route, m.groupdict(), True
        return None, {}, path_known

    def handle(self, request: Request) -> Response:
        """Answer one request (raises :class:`DropConnection` to answer nothing)."""
        route, params, path_known = self.match(request.method, request.path)
        label = route.label if route else f"{request.method} (unmatched)"
        budget: Budget | None = None
        try:
            if route is None:
                if path_known:
                    raise ApiError(
                        405, "Method not allowed", f"{request.method} is not allowed here"
                    )
                raise not_found()
            if route.kind == "api":
                budget = self._gate(route, request)
            elif route.kind == "file":
                self._fault_500()
            response: Response = getattr(self, route.handler)(request, **params)
        except ApiError as exc:
            response = Response.problem(exc)
        except DropConnection:
            self.engine.record_request(label, "dropped")
            raise
        except Exception:
            log.exception("emulator route %s crashed", label)
            response = Response.problem(ApiError(500, "Internal server error", "Unexpected error"))
        if budget is None:
            budget = self._other_bucket.peek(
                self.engine.config.requests_per_minute, burst=self.engine.config.requests_burst
            )
        response.headers.setdefault("ratelimit-remaining", str(budget.remaining))
        response.headers.setdefault("ratelimit-reset", str(budget.reset_s))
        self.engine.record_request(label, response.status)
        return response

    def _gate(self, route: Route, request: Request) -> Budget:
        cfg = self.engine.config
        if not self._authorized(request.headers.get("Authorization")):
            raise ApiError(401, "Unauthenticated", "You did not pass a valid authentication token")
        self._fault_500()
        if route.creates:
            budget = self._create_bucket.take(
                cfg.creates_per_minute, enforce=cfg.rate_limit, burst=cfg.creates_burst
            )
        else:
            budget = self._other_bucket.take(
                cfg.requests_per_minute, enforce=cfg.rate_limit, burst=cfg.requests_burst
            )
        if route.creates:
            self.engine.count("create_requests")
        if not budget.allowed:
            self.engine.count("rate_limited")
            if route.creates:
                self.engine.count("creates_throttled")
            raise self._throttled(budget.retry_after_s, budget)
        if route.throttle_fault and self.engine.draw("http_429", cfg.faults.http_429_rate):
            if route.creates:
                self.engine.count("creates_throttled")
            raise self._throttled(cfg.faults.retry_after_s, budget)
        return budget

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        # "Token" is the older scheme Replicate still accepts.
        return scheme.lower() in ("bearer", "token") and token.strip() == self.engine.config.token

    def _fault_500(self) -> None:
        if self.engine.draw("http_500", self.engine.config.faults.http_500_rate):
            raise ApiError(500, "Internal server error", "Injected fault: please retry.")

    @staticmethod
    def _throttled(retry_after: int, budget: Budget) -> ApiError:
        unit = "second" if retry_after == 1 else "seconds"
        return ApiError(
            429,
            "Request was throttled",
            f"Request was throttled. Expected available in {retry_after} {unit}.",
            headers={
                "Retry-After": str(retry_after),
                "ratelimit-remaining": str(budget.remaining),
                "ratelimit-reset": str(max(budget.reset_s, retry_after)),
            },
        )

    # ------------------------------------------------------------------------ predictions

    def create(self, request: Request) -> Response:
        """``POST /v1/predictions`` with ``version`` = id, ``owner/name:id`` or ``owner/name``."""
        body = self._body_object(request)
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise validation_error(
                [{"type": "required", "field": "version", "description": "version is required"}]
            )
        return self._create(request, body, self._resolve_version(version), by_model_path=False)

    def create_for_model(self, request: Request, owner: str, name: str) -> Response:
        """``POST /v1/models/{owner}/{name}/predictions`` (the model's latest version)."""
        model = model_for(f"{owner}/{name}")
        return self._create(request, self._body_object(request), model, by_model_path=True)

    def create_for_deployment(self, request: Request, owner: str, name: str) -> Response:
        """``POST /v1/deployments/{owner}/{name}/predictions``: the deployment's model and
        version run it, and the prediction names the deployment; unknown deployment -> 404."""
        model, _ = self.engine.deployment(owner, name)
        return self._create(
            request, self._body_object(request), model, deployment=f"{owner}/{name}"
        )

    def get_deployment(self, request: Request, owner: str, name: str) -> Response:
        """``GET /v1/deployments/{owner}/{name}`` with its current release; unknown -> 404."""
        return Response.json(200, self.engine.deployment(owner, name)[1])

    def list_deployments(self, request: Request) -> Response:
        """``GET /v1/deployments``: every configured deployment, one page."""
        results = []
        for key in sorted(self.engine.config.deployments):
            owner, _, name = key.partition("/")
            results.append(self.engine.deployment(owner, name)[1])
        return Response.json(200, {"previous": None, "next": None, "results": results})

    @staticmethod
    def _resolve_version(ref: str) -> DemoModel:
        invalid = ApiError(
            422,
            "Invalid version or not permitted",
            "The specified version does not exist (or perhaps you don't have permission to "
            "use it?)",
        )
        if "/" in ref:
            model_ref, _, version_id = ref.partition(":")
            model = MODELS.get(model_ref)
            if model is None or (version_id and version_id != model.version_id):
                raise invalid
            return model
        model = VERSIONS.get(ref)
        if model is None:
            raise invalid
        return model

    @staticmethod
    def _body_object(request: Request) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            raise ApiError(400, "Bad request", "The request body must be a JSON object.")
        return body

    def _create(
        self,
        request: Request,
        body: dict[str, Any],
        model: DemoModel,
        *,
        by_model_path: bool = False,
        deployment: str | None = None,
    ) -> Response:
        webhook, events = self._webhook_options(body)
        wait_s = parse_prefer_wait(request.headers.get("Prefer"))
        cancel_after = request.headers.get("Cancel-After")
        deadline = parse_duration(cancel_after) if cancel_after else None
        pred, snapshot, drop = self.engine.create(
            model,
            body.get("input", {}),
            webhook=webhook,
            webhook_events=events,
            deadline_s=deadline,
            by_model_path=by_model_path,
            deployment=deployment,
        )
        if drop:
            raise DropConnection()
        if wait_s is not None:
            pred.done.wait(wait_s)
            snapshot = self.engine.snapshot(pred.id, hide_progress=True)
        return Response.json(201, snapshot)

    @staticmethod
    def _webhook_options(body: dict[str, Any]) -> tuple[str | None, frozenset[str]]:
        webhook = body.get("webhook")
        events: frozenset[str] = WEBHOOK_EVENTS
        if webhook is None and body.get("webhook_completed"):
            # The older field: a URL for the completed event only.
            webhook, events = body["webhook_completed"], frozenset({"completed"})
        problems = []
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
        ):
            problems.append(
                {"type": "format", "field": "webhook", "description": "Must be an HTTP(S) URL"}
            )
        raw_filter = body.get("webhook_events_filter")
        if raw_filter is not None:
            if not isinstance(raw_filter, list) or not all(e in WEBHOOK_EVENTS for e in raw_filter):
                allowed = ", ".join(sorted(WEBHOOK_EVENTS))
                problems.append(
                    {
                        "type": "enum",
                        "field": "webhook_events_filter",
                        "description": f"Each event must be one of: {allowed}",
                    }
                )
            else:
                events = frozenset(raw_filter)
        if problems:
            raise validation_error(problems)
        return webhook, events

    def get_prediction(self, request: Request, id: str) -> Response:
        """``GET /v1/predictions/{id}`` (or a broken answer, see ``EmulatorConfig.garbled``)."""
        garbled = self.engine.config.garbled.get(id)
        if garbled == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1>upstream unavailable</body></html>"
            return Response(200, page, "text/html")
        if garbled == "no-id":
            return Response.json(200, {"detail": "ok"})
        snapshot = self.engine.snapshot(id)
        if garbled == "deep":
            depth = 5000
            text = json.dumps(snapshot, separators=(",", ":"))
            # A repeated key: JSON decoders keep the last one, this output.
            body = text[:-1] + ',"output":' + "[" * depth + "]" * depth + "}"
            return Response(200, body.encode(), "application/json")
        return Response.json(200, snapshot)

    def cancel(self, request: Request, id: str) -> Response:
        """``POST /v1/predictions/{id}/cancel``: idempotent, answers the prediction."""
        return Response.json(200, self.engine.cancel(id))

    def list_predictions(self, request: Request) -> Response:
        """``GET /v1/predictions``: newest first; ``next``/``previous`` are absolute URLs."""
        filters = {
            k: v for k in ("created_after", "created_before") if (v := request.arg(k)) is not None
        }
        page = self.engine.list_page(
            request.arg("cursor"),
            created_after=_parse_time(filters.get("created_after"), "created_after"),
            created_before=_parse_time(filters.get("created_before"), "created_before"),
        )

        def link(cursor: str | None) -> str | None:
            if cursor is None:
                return None
            query = urlencode({"cursor": cursor, **filters})
            return f"{self.engine.base_url}/v1/predictions?{query}"

        doc = {
            "previous": link(page.previous_cursor),
            "next": link(page.next_cursor),
            "results": page.results,
        }
        return Response.json(200, doc)

    # ------------------------------------------------------------------------ models

    def _model_json(self, model: DemoModel) -> dict[str, Any]:
        return {
            "url": f"{self.engine.base_url}/{model.ref}",
            "owner": model.owner,
            "name": model.name,
            "description": model.description,
            "visibility": "public",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": self.engine.run_count(model.ref),
            "cover_image_url": None,
            "default_example": None,
            "latest_version": model.version_json(),
        }

    def list_models(self, request: Request) -> Response:
        """``GET /v1/models``: the demo models, one page."""
        results = [self._model_json(m) for m in MODELS.values()]
        return Response.json(200, {"previous": None, "next": None, "results": results})

    def get_model(self, request: Request, owner: str, name: str) -> Response:
        """``GET /v1/models/{owner}/{name}``."""
        return Response.json(200, self._model_json(model_for(f"{owner}/{name}")))

    def list_versions(self, request: Request, owner: str, name: str) -> Response:
        """``GET /v1/models/{owner}/{name}/versions``."""
        model = model_for(f"{owner}/{name}")
        return Response.json(
            200, {"previous": None, "next": None, "results": [model.version_json()]}
        )

    def get_version(self, request: Request, owner: str, name: str, version: str) -> Response:
        """``GET /v1/models/{owner}/{name}/versions/{id}`` with the ``openapi_schema``."""
        model = model_for(f"{owner}/{name}")
        if version != model.version_id:
            raise not_found(f"Version {version} of {model.ref} does not exist.")
        return Response.json(200, model.version_json())

    def webhook_secret(self, request: Request) -> Response:
        """``GET /v1/webhooks/default/secret``."""
        return Response.json(200, {"key": self.engine.config.signing_secret})

    def account(self, request: Request) -> Response:
        """``GET /v1/account``: a cheap authenticated call, handy as a health check."""
        doc = {"type": "organization", "username": "emulator", "name": "Replicate emulator"}
        return Response.json(200, {**doc, "github_url": None})

    # ------------------------------------------------------------------------ files & web

    def output_file(self, request: Request, id: str, index: str, ext: str) -> Response:
        """``GET /files/{id}/{index}.{ext}``: no auth, like replicate.delivery."""
        out = self.engine.file(id, int(index), ext)
        if out.redirect is not None:  # test models only
            return Response(302, b"", "text/plain", {"Location": out.redirect})
        return Response(200, out.data, out.content_type, {"Cache-Control": "private, max-age=60"})

    def web_page(self, request: Request, id: str) -> Response:
        """``GET /p/{id}``: the ``urls.web`` page, a minimal human view of a prediction."""
        doc = self.engine.snapshot(id)
        outputs = doc["output"] if isinstance(doc["output"], list) else []
        images = "".join(
            f'<img src="{html.escape(u)}" alt="output">'
            for u in outputs
            if isinstance(u, str) and u.endswith(".png")
        )
        page = (
            f"<!doctype html><title>{html.escape(id)}</title><h1>{html.escape(doc['model'])}</h1>"
            f"<p>status: {html.escape(doc['status'])}</p>{images}"
            f"<pre>{html.escape(json.dumps(doc, indent=2))}</pre>"
        )
        return Response(200, page.encode(), "text/html; charset=utf-8")

    # ------------------------------------------------------------------------ controls

    def control_health(self, request: Request) -> Response:
        """``GET /_emulator/health``."""
        return Response.json(200, {"ok": True, "base_url": self.engine.base_url})

    def control_stats(self, request: Request) -> Response:
        """``GET /_emulator/stats``."""
        return Response.json(200, self.engine.stats())

    def control_predictions(self, request: Request) -> Response:
        """``GET /_emulator/predictions``: every prediction with the emulator's private view."""
        return Response.json(200, self.engine.predictions())

    def control_config(self, request: Request) -> Response:
        """``GET /_emulator/config``."""
        return Response.json(200, self.engine.config.to_json())

    def control_configure(self, request: Request) -> Response:
        """``POST /_emulator/config`` with a partial config (``faults`` may be partial too)."""
        changes = self._body_object(request)
        try:
            config = self.engine.configure(**changes)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "Bad request", str(exc)) from None
        return Response.json(200, config.to_json())

    def control_web_prediction(self, request: Request) -> Response:
        """``POST /_emulator/web_predictions`` ``{"model": ..., "input": {...}}``: a prediction
        made on the website (``source: web``), as a person sharing the account would."""
        body = self._body_object(request)
        model = MODELS.get(str(body.get("model")))
        if model is None:
            raise not_found(f"unknown model {body.get('model')!r}")
        _, snapshot, _ = self.engine.create(model, body.get("input", {}), source="web")
        return Response.json(201, snapshot)

    def control_expire(self, request: Request) -> Response:
        """``POST /_emulator/expire`` ``{"prediction_ids": [...]}`` (omit for all)."""
        ids = self._body_object(request).get("prediction_ids")
        return Response.json(200, {"removed": self.engine.expire_outputs(ids)})


class _Server(LocalHTTPServer):
    app: App


class _Handler(TrackedHandler):
    server_version = "replicate-emulator/1.0"
    logger = log
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        try:
            body = self.read_body(MAX_BODY_BYTES)
        except ValueError as exc:
            # The stream position is unknown now: answer and close rather than misparse.
            self.close_connection = True
            if isinstance(exc, BodyTooLarge):
                detail = f"The request body is over the {MAX_BODY_BYTES}-byte limit."
            else:
                detail = f"The request body could not be read: {exc}."
            self._write(Response.problem(ApiError(400, "Bad request", detail)))
            return
        request = Request(self.command, parts.path, parse_qs(parts.query), self.headers, body)
        try:
            response = self.server.app.handle(request)
        except DropConnection:
            # The work is done; the answer is lost on the way, as when a proxy cuts the line.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(response)

    def _write(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class EmulatorHandle:
    """A running emulator: where it listens, its credentials, and its controls."""

    def __init__(self, server: _Server, engine: Engine, thread: threading.Thread) -> None:
        self._server = server
        self._engine = engine
        self._thread = thread
        self._stopped = False
        self.host, self.port = server.server_address[:2]

    @property
    def base_url(self) -> str:
        """``http://host:port`` (or the configured ``public_base_url``)."""
        return self._engine.base_url

    @property
    def token(self) -> str:
        """The accepted API token."""
        return self._engine.config.token

    @property
    def webhook_secret(self) -> str:
        """The ``whsec_...`` webhook signing secret."""
        return self._engine.config.signing_secret

    @property
    def config(self) -> EmulatorConfig:
        """The settings in force now."""
        return self._engine.config

    @property
    def engine(self) -> Engine:
        """The engine behind the server (tests may inspect it directly)."""
        return self._engine

    def stats(self) -> dict[str, Any]:
        """Counters: requests by route, creates, paid predictions, statuses, 429s, 500s..."""
        return self._engine.stats()

    def configure(self, **changes: Any) -> EmulatorConfig:
        """Change settings at runtime, e.g. ``configure(faults=Faults(...), latency_s=0.1)``;
        ``faults`` may also be a dict of just the rates to change."""
        return self._engine.configure(**changes)

    def predictions(self) -> list[dict[str, Any]]:
        """Every prediction so far, oldest first (public JSON plus ``_emulator`` details)."""
        return self._engine.predictions()

    def web_prediction(self, model: str, input: dict[str, Any]) -> dict[str, Any]:
        """Make a prediction as if on the website (``source: web``); its JSON."""
        return self._engine.create(MODELS[model], input, source="web")[1]

    def expire_outputs(self, prediction_ids: list[str] | None = None) -> int:
        """Delete outputs now, as if retention had passed."""
        return self._engine.expire_outputs(prediction_ids)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no prediction is starting or processing (stuck ones never end)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self._engine.stats()["predictions_by_status"]
            if counts["starting"] == 0 and counts["processing"] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._engine.stop()
        self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmulatorHandle({self.base_url})"


def start_emulator(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> EmulatorHandle:
    """Start an emulator serving on ``host:port`` (0 = any free port) in a background thread."""
    config = config or EmulatorConfig()
    # The engine's URLs need the bound port: bind first, attach the app before serving.
    server = _Server((host, port), _Handler)
    bound_port = server.server_address[1]
    shown_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    base_url = config.public_base_url or f"http://{shown_host}:{bound_port}"
    engine = Engine(config, base_url)
    server.app = App(engine)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"replicate-emulator:{bound_port}",
        daemon=True,
    )
    thread.start()
    return EmulatorHandle(server, engine, thread)
