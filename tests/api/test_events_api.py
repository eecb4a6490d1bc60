"""Live status over real HTTP: Server-Sent Events and user tokens, on SQLite and PostgreSQL.

Proves: a stream shows ``pending`` -> ``queued`` -> ``running`` -> ``succeeded`` as another
process-like writer moves the generation (so each event arrives by a wake-up, LISTEN/NOTIFY on
PostgreSQL, the worker's poller on SQLite), then ends; a dropped stream resumed with
``Last-Event-ID`` gets every later event, the terminal one included, and a stream resumed after
the terminal event is 204 (an EventSource stops); a ``Last-Event-ID`` that is not an event id is
422 (not 404) and one of another generation, or past the last event, is a position in the log; a
failed generation's stream ends with ``failed`` and ``refunded: true``; many streams on one
generation all see its end; a server stopped with streams open (``ai-handler serve`` on SIGINT or
SIGTERM with one worker or two, the embedded server, an ASGI lifespan ending) ends each stream
cleanly and stops; and the token matrix: a token reads its own user's data by header or
``access_token``, and is refused when expired, tampered with, for another user, used to write, or
when its key is revoked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from httpx_sse import ServerSentEvent, connect_sse

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys, tokens
from ai_handler_dagster.api.app import create_app
from ai_handler_dagster.api.server import start_server
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.pricing import load_pricing
from tests.support.api import Api

IMAGE = "demo/pixel-sketch"  # 5 credits per output
PROBLEM = "application/problem+json"


def _grant(engine: sa.Engine, user: str, amount: int) -> None:
    with session_scope(engine) as session:
        ledger.grant(session, user, amount, f"grant:{user}:{amount}:{time.monotonic_ns()}")


def _submit(api: Api, user: str = "ann") -> int:
    _grant(api.engine, user, 100)
    with api.client(api.key(keys.SUBMIT)) as http:
        answer = http.post(
            "/v1/generations", json={"user": user, "model": IMAGE, "input": {"prompt": "a fox"}}
        )
    assert answer.status_code == 202, answer.text
    gid: int = answer.json()["id"]
    return gid


def _queue(engine: sa.Engine, gid: int) -> None:
    with session_scope(engine) as session:
        assert gens.claim_pending(session, limit=10, batch_key_fn=lambda rows: f"b{gid}")


def _start(engine: sa.Engine, gid: int) -> None:
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id=f"r{gid}", prices=load_pricing())


def _output(gid: int) -> dict[str, Any]:
    """An output record as finalize writes it (the stream only signs a link to it)."""
    key = f"generations/{gid}/a1/0.png"
    return {
        "bucket": "outputs",
        "key": key,
        "uri": f"s3://outputs/{key}",
        "size": 3,
        "sha256": "0" * 64,
        "content_type": "image/png",
    }


def _succeed(engine: sa.Engine, gid: int) -> None:
    with session_scope(engine) as session:
        gens.succeed(session, gid, outputs=[_output(gid)], predict_time=1.0, prices=load_pricing())


@pytest.fixture(autouse=True)
def _s3_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Presigning a link is local: no S3 has to answer.
    monkeypatch.setenv("AI_HANDLER_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AI_HANDLER_S3_BUCKET", "outputs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def _fail(engine: sa.Engine, gid: int) -> None:
    with session_scope(engine) as session:
        gens.fail(session, gid, code="provider_error", message="the model crashed")


def _to_success(engine: sa.Engine, gid: int) -> list[Callable[[], None]]:
    """The steps that take a pending generation to ``succeeded``, one transaction each."""
    return [lambda: _queue(engine, gid), lambda: _start(engine, gid), lambda: _succeed(engine, gid)]


def _events(
    http: httpx.Client, gid: int, *, last: str | None = None, until: int | None = None
) -> list[ServerSentEvent]:
    """The stream's events until it ends (or ``until`` of them, then drop the connection)."""
    headers = {"Last-Event-ID": last} if last else {}
    seen = []
    with connect_sse(http, "GET", f"/v1/generations/{gid}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            seen.append(event)
            if until is not None and len(seen) == until:
                break
    return seen


def _later(*steps: Callable[[], None], pause: float = 0.3) -> threading.Thread:
    """Run ``steps`` one after another in a thread, ``pause`` apart, starting after a pause:
    the stream is open and waiting when each change commits."""

    def run() -> None:
        for step in steps:
            time.sleep(pause)
            step()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def reader_http(api: Api) -> Iterator[httpx.Client]:
    with api.client(api.key(keys.READ)) as http:
        yield http


def test_a_stream_shows_every_state_until_success_then_ends(
    api: Api, reader_http: httpx.Client
) -> None:
    gid = _submit(api)
    writer = _later(*_to_success(api.engine, gid))
    started = time.monotonic()
    seen = _events(reader_http, gid)
    writer.join()
    assert [e.event for e in seen] == ["pending", "queued", "running", "succeeded"]
    ids = [int(e.id) for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == 4
    final = json.loads(seen[-1].data)
    assert final["generation_id"] == gid and final["status"] == "succeeded"
    assert final["credits"] == {"held": 5, "charged": 5}
    assert [o["index"] for o in final["outputs"]] == [0]
    assert final["outputs"][0]["url"].startswith("http://127.0.0.1:9/outputs/generations/")
    assert all(json.loads(e.data)["status"] == e.event for e in seen)
    # Woken, not timed out: the whole story takes about the writer's pauses.
    assert time.monotonic() - started < 10


def test_a_dropped_stream_resumes_without_missing_the_terminal_event(
    api: Api, reader_http: httpx.Client
) -> None:
    gid = _submit(api)
    _queue(api.engine, gid)
    first = _events(reader_http, gid, until=2)
    assert [e.event for e in first] == ["pending", "queued"]
    # Changes while no stream is open, then the client comes back.
    _start(api.engine, gid)
    _succeed(api.engine, gid)
    rest = _events(reader_http, gid, last=first[-1].id)
    assert [e.event for e in rest] == ["running", "succeeded"]
    assert int(rest[0].id) > int(first[-1].id)
    # Resumed after the terminal event: 204, which tells an EventSource to stop.
    again = reader_http.get(f"/v1/generations/{gid}/events", headers={"Last-Event-ID": rest[-1].id})
    assert again.status_code == 204


def test_a_failed_generation_stream_ends_with_failed_and_refunded(
    api: Api, reader_http: httpx.Client
) -> None:
    gid = _submit(api)
    writer = _later(
        lambda: _queue(api.engine, gid),
        lambda: _start(api.engine, gid),
        lambda: _fail(api.engine, gid),
    )
    seen = _events(reader_http, gid)
    writer.join()
    assert [e.event for e in seen][-1] == "failed"
    final = json.loads(seen[-1].data)
    assert final["refunded"] is True and final["error_code"] == "provider_error"
    assert final["error_message"] == "the model crashed"
    assert final["credits"]["charged"] == 0
    with session_scope(api.engine) as session:
        assert ledger.balance(session, "ann").available == 100


def test_many_streams_on_one_generation_all_see_it_end(api: Api) -> None:
    gid = _submit(api)
    key = api.key(keys.READ)

    def follow(_: int) -> list[str]:
        with api.client(key) as http:
            return [e.event for e in _events(http, gid)]

    writer = _later(*_to_success(api.engine, gid), pause=0.5)
    with ThreadPoolExecutor(20) as pool:
        streams = list(pool.map(follow, range(20)))
    writer.join()
    assert streams == [["pending", "queued", "running", "succeeded"]] * 20


def test_an_unknown_generation_is_a_problem(
    reader_http: httpx.Client,
) -> None:
    answer = reader_http.get("/v1/generations/999/events")
    assert answer.status_code == 404 and answer.headers["content-type"].startswith(PROBLEM)


def _log(engine: sa.Engine) -> list[tuple[int, int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT id, generation_id, status FROM generation_events ORDER BY id")
        )
        return [(r.id, r.generation_id, r.status) for r in rows]


@pytest.mark.parametrize(
    "header",
    ["abc", "-1", "1e3", "+5", "1_000", "0x10", "1 2", "3.0", str(2**63), "9" * 40],
)
def test_a_malformed_last_event_id_is_422_not_404(
    api: Api, reader_http: httpx.Client, header: str
) -> None:
    # Answered 404 not-found ("not an event id of this stream"), as if the generation were
    # missing: a client could only conclude that the generation does not exist. "1_000" and
    # "+5" were taken as 1000 and 5 (Python's int() accepts them).
    gid = _submit(api)
    before = _log(api.engine)
    url = f"/v1/generations/{gid}/events"
    # Streamed: a value taken for an event id opens a stream that would never end.
    with reader_http.stream("GET", url, headers={"Last-Event-ID": header}) as answer:
        assert answer.status_code == 422, answer.headers
        answer.read()
    _refused(answer, 422, "invalid-request")
    body = answer.json()
    [error] = body["errors"]
    assert error["field"] == "header.last-event-id" and "not an event id" in error["message"]
    assert body["detail"].startswith("Last-Event-ID: not an event id")
    assert _log(api.engine) == before
    with api.client() as http:
        described = http.get(body["type"]).json()
    assert described["status"] == 422


def test_a_malformed_last_event_id_of_an_unknown_generation_is_still_422(
    reader_http: httpx.Client,
) -> None:
    answer = reader_http.get("/v1/generations/999/events", headers={"Last-Event-ID": "abc"})
    _refused(answer, 422, "invalid-request")


def test_last_event_id_is_a_position_in_the_event_log(api: Api, reader_http: httpx.Client) -> None:
    # Event ids are one sequence for every generation, so an id is a position in the log
    # whichever generation it belongs to: the stream sends this generation's events after it.
    ann = _submit(api, "ann")
    bob = _submit(api, "bob")
    _queue(api.engine, ann)  # claims both
    _start(api.engine, ann)
    _succeed(api.engine, ann)
    bobs_pending = next(i for i, g, s in _log(api.engine) if g == bob and s == "pending")
    anns = [(i, s) for i, g, s in _log(api.engine) if g == ann]
    seen = _events(reader_http, ann, last=str(bobs_pending))
    assert [(int(e.id), e.event) for e in seen] == [(i, s) for i, s in anns if i > bobs_pending]
    assert [e.event for e in seen] == ["queued", "running", "succeeded"]
    # Leading zeros are still a decimal event id, however many (int() refuses a string of
    # over 4300 digits: that must not be a 500).
    again = _events(reader_http, ann, last="0" * 5000 + str(bobs_pending))
    assert [e.id for e in again] == [e.id for e in seen]


def test_last_event_id_beyond_the_last_event(api: Api, reader_http: httpx.Client) -> None:
    # An ended generation with nothing after the id: 204, an EventSource stops.
    done = _submit(api)
    _queue(api.engine, done)
    _start(api.engine, done)
    _succeed(api.engine, done)
    beyond = str(2**63 - 1)
    answer = reader_http.get(f"/v1/generations/{done}/events", headers={"Last-Event-ID": beyond})
    assert answer.status_code == 204
    # A live generation: the stream opens, sends no event at or before the id, and still ends
    # when the generation does (it does not wait for ever).
    live = _submit(api)
    writer = _later(*_to_success(api.engine, live))
    started = time.monotonic()
    seen = _events(reader_http, live, last=beyond)
    writer.join()
    assert seen == []
    assert time.monotonic() - started < 20
    answer = reader_http.get(f"/v1/generations/{live}/events", headers={"Last-Event-ID": beyond})
    assert answer.status_code == 204


# --- shutting down with open streams ------------------------------------------------------------

#: How long a stop may take with streams open (it takes about a second; a hang is for ever).
_STOP_S = 20


class _Follower(threading.Thread):
    """A client following one stream: ``opened`` once its first event arrived, then ``outcome``
    ("ended": the response ended cleanly; else the error) and the events seen."""

    def __init__(self, url: str, key: str, gid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.gid = url, key, gid
        self.opened = threading.Event()
        self.seen: list[str] = []
        self.outcome: str | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            with (
                httpx.Client(base_url=self.url, headers=headers, timeout=60) as http,
                connect_sse(http, "GET", f"/v1/generations/{self.gid}/events") as source,
            ):
                for event in source.iter_sse():
                    self.seen.append(event.event)
                    self.opened.set()
            self.outcome = "ended"
        except Exception as exc:  # a cut-off body (RemoteProtocolError), a refusal, a timeout
            self.outcome = f"{type(exc).__name__}: {exc}"
        finally:
            self.opened.set()


def _follow(url: str, key: str, gid: int, count: int = 3) -> list[_Follower]:
    """``count`` clients on the stream of ``gid``, returned once each has its first event."""
    followers = [_Follower(url, key, gid) for _ in range(count)]
    for follower in followers:
        follower.start()
    for follower in followers:
        assert follower.opened.wait(60), "a stream did not open"
        assert follower.seen == ["pending"], follower.outcome
    return followers


def _assert_ended(followers: list[_Follower]) -> None:
    for follower in followers:
        follower.join(_STOP_S)
        assert not follower.is_alive(), "a client is still waiting on its stream"
        # Ended as a response ends (the closing chunk), not cut off with the connection.
        assert (follower.outcome, follower.seen) == ("ended", ["pending"])


def _direct_submit(engine: sa.Engine) -> tuple[int, str]:
    """A generation that stays pending (nothing runs it) and a read key."""
    _grant(engine, "ann", 100)
    with session_scope(engine) as session:
        row = gens.submit(
            session, user_id="ann", model=IMAGE, input={"prompt": "a"}, prices=load_pricing()
        )
        key, _ = keys.create(session, name="reader", scopes=[keys.READ])
    return row.id, key


def test_stopping_the_server_ends_open_streams(engine: sa.Engine) -> None:
    # ServerHandle.stop() (the embedded stack's, the tests') waited its 10 s and returned with
    # the server still running: uvicorn waits for every connection to close before the lifespan
    # shutdown, a stream's connection closes only when its generation ends, and sse-starlette
    # ends streams only when it finds uvicorn's signal handler, which a server in a thread has
    # not installed. The clients waited on their streams until they gave up.
    gid, key = _direct_submit(engine)
    with start_server(create_app(engine, prices=load_pricing())) as handle:
        followers = _follow(handle.url, key, gid)
        started = time.monotonic()
        handle.stop()
        assert time.monotonic() - started < _STOP_S
        assert not handle._thread.is_alive(), "the server is still running"
    _assert_ended(followers)


@pytest.mark.parametrize(("workers", "sig"), [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_ai_handler_serve_stops_with_open_streams(
    engine: sa.Engine, db_url: str, tmp_path: Path, workers: int, sig: signal.Signals
) -> None:
    # The real command, one worker (uvicorn's signal handlers in the process) or two (its
    # supervisor sends each worker SIGTERM): the signal ends every open stream cleanly and the
    # command exits 0 soon after, instead of waiting for every client to leave.
    gid, key = _direct_submit(engine)
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "ai_handler_dagster.cli", "serve", "--workers", str(workers)),
            *("--port", "0", "--port-file", str(port_file), "--log-level", "warning"),
        ],
        env={**os.environ, "AI_HANDLER_DATABASE_URL": db_url},
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, "ai-handler serve exited"
            assert time.monotonic() < deadline, "ai-handler serve did not bind its port"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        followers = _follow(url, key, gid)
        started = time.monotonic()
        process.send_signal(sig)
        assert process.wait(timeout=_STOP_S) == 0
        assert time.monotonic() - started < _STOP_S
        _assert_ended(followers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_lifespan_ending_ends_open_streams(engine: sa.Engine) -> None:
    # A server that ends the app's lifespan with responses still open (uvicorn waits for them
    # first; others need not): Hub.close() woke every stream, each read again and went back to
    # sleep, so its response never ended. Driven as ASGI, without uvicorn, so nothing else can
    # end the stream.
    gid, key = _direct_submit(engine)
    app = create_app(engine, prices=load_pricing())
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        first = asyncio.Event()
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Future()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if b"event: pending" in message.get("body", b""):
                first.set()

        async with app.router.lifespan_context(app) as state:
            path = f"/v1/generations/{gid}/events"
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"host", b"test"), (b"authorization", f"Bearer {key}".encode())],
                "client": ("127.0.0.1", 50000),
                "server": ("test", 80),
                "state": dict(state or {}),
            }
            answering = asyncio.create_task(app(scope, receive, send))
            await asyncio.wait_for(first.wait(), 60)
        await asyncio.wait_for(answering, _STOP_S)

    asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    events = b"".join(m.get("body", b"") for m in sent)
    assert events.count(b"event: ") == 1


# --- user tokens ---------------------------------------------------------------------------------


def _token(api: Api, user: str, key: str | None = None, **body: Any) -> str:
    with api.client(key or api.key(keys.READ)) as http:
        answer = http.post("/v1/tokens", json={"user": user, **body})
    assert answer.status_code == 201, answer.text
    shown = answer.json()
    assert shown["user"] == user and shown["scopes"] == ["read"]
    token: str = shown["token"]
    return token


def _refused(answer: httpx.Response, status: int, slug: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["type"] == f"/problems/{slug}"


def test_a_token_reads_its_own_user_by_header_or_query(api: Api) -> None:
    gid = _submit(api, "ann")
    token = _token(api, "ann")
    with api.client(token) as http:
        assert http.get(f"/v1/generations/{gid}").json()["user"] == "ann"
        assert http.get("/v1/users/ann/credits").json()["available"] == 95
        assert http.get("/v1/users/ann/ledger").status_code == 200
        listed = http.get("/v1/generations").json()["items"]
        assert [g["id"] for g in listed] == [gid]
    with api.client() as http:
        shown = http.get(f"/v1/generations/{gid}", params={"access_token": token})
        assert shown.status_code == 200 and shown.json()["id"] == gid
        _queue(api.engine, gid)
        _start(api.engine, gid)
        _succeed(api.engine, gid)
        with connect_sse(
            http, "GET", f"/v1/generations/{gid}/events", params={"access_token": token}
        ) as source:
            assert [e.event for e in source.iter_sse()] == [
                "pending",
                "queued",
                "running",
                "succeeded",
            ]


def test_a_token_for_another_user_is_refused(api: Api) -> None:
    bob = _submit(api, "bob")
    token = _token(api, "ann")
    with api.client(token) as http:
        _refused(http.get(f"/v1/generations/{bob}"), 403, "foreign-user")
        _refused(http.get(f"/v1/generations/{bob}/events"), 403, "foreign-user")
        _refused(http.get("/v1/users/bob/credits"), 403, "foreign-user")
        _refused(http.get("/v1/users/bob/ledger"), 403, "foreign-user")
        _refused(http.get("/v1/generations", params={"user": "bob"}), 403, "foreign-user")


def test_a_token_cannot_write(api: Api) -> None:
    gid = _submit(api, "ann")
    token = _token(api, "ann")
    with api.client(token) as http:
        body = {"user": "ann", "model": IMAGE, "input": {"prompt": "x"}}
        _refused(http.post("/v1/generations", json=body), 403, "forbidden-scope")
        _refused(http.post(f"/v1/generations/{gid}/cancel"), 403, "forbidden-scope")
        _refused(http.post("/v1/tokens", json={"user": "ann"}), 403, "forbidden-scope")
    with session_scope(api.engine) as session:
        assert gens.get(session, gid).status == "pending"


def test_an_expired_or_tampered_token_is_refused(api: Api) -> None:
    gid = _submit(api, "ann")
    key = api.key(keys.READ)
    caller = _caller(api, key)
    with api.engine.connect() as connection:
        expired = tokens.mint(connection, caller, "ann", ttl_s=60, clock=lambda: time.time() - 61)
    good = _token(api, "ann", key)
    claims = jwt.decode(good, options={"verify_signature": False})
    forged = jwt.encode(
        {**claims, "sub": "bob"},
        "not the key, but long enough for HS256",
        algorithm="HS256",
        headers={"kid": caller.key_id},
    )
    header, payload, signature = good.split(".")
    for bad in (expired, forged, f"{header}.{payload}.{signature[:-4]}AAAA", "a.b.c"):
        with api.client(bad) as http:
            _refused(http.get(f"/v1/generations/{gid}"), 401, "invalid-token")
            _refused(http.get(f"/v1/generations/{gid}/events"), 401, "invalid-token")


def test_a_token_dies_with_its_key(api: Api) -> None:
    gid = _submit(api, "ann")
    key = api.key(keys.READ)
    token = _token(api, "ann", key)
    with api.client(token) as http:
        assert http.get(f"/v1/generations/{gid}").status_code == 200
        with session_scope(api.engine) as session:
            keys.revoke(session, key)
        _refused(http.get(f"/v1/generations/{gid}"), 401, "invalid-token")


def test_minting_needs_the_read_scope_and_a_valid_request(api: Api) -> None:
    with api.client(api.key(keys.SUBMIT)) as http:
        _refused(http.post("/v1/tokens", json={"user": "ann"}), 403, "forbidden-scope")
    with api.client(api.key(keys.READ)) as http:
        for body in (
            {"user": "ann", "ttl_s": 0},
            {"user": "ann", "ttl_s": tokens.MAX_TTL_S + 1},
            {"user": ""},
            {"user": "a\tb"},
            {"user": "ann", "scope": "admin"},
        ):
            _refused(http.post("/v1/tokens", json=body), 422, "invalid-request")


def _caller(api: Api, key: str) -> keys.Caller:
    with api.engine.connect() as connection:
        found = keys.authenticate(connection, key)
    assert found is not None
    return found
