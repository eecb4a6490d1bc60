"""The service's frame: real HTTP on uvicorn, keys and scopes, the per-key limit, body limits,
problem details, and the generation event log.

Proves: a missing, malformed, unknown or revoked key is 401 and a key without the scope 403,
each as ``application/problem+json`` with a stable ``type`` the service describes; a revoked key
is refused on its very next request; a key over its per-minute limit gets 429 with
``Retry-After`` (the count lives in the database, so two apps on one database share it); a body
over the limit is 413 before it is read; every generation transition appends its event in the
same transaction (a rolled-back submit leaves none).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys, ratelimit
from ai_handler_dagster.api.app import create_app
from ai_handler_dagster.api.server import start_server
from ai_handler_dagster.db.engine import make_counter_engine, session_scope
from ai_handler_dagster.db.models import ApiRequestCount, Generation, GenerationEvent
from ai_handler_dagster.pricing import load_pricing
from tests.support.api import Api
from tests.support.db import race

PROBLEM = "application/problem+json"


def test_health_and_readiness_need_no_key(api: Api) -> None:
    with api.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}


def _is_problem(answer: object, status: int, slug: str) -> dict[str, object]:
    import httpx

    assert isinstance(answer, httpx.Response)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body = answer.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    assert body["title"] and body["detail"]
    return dict(body)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer aih_000000000000_" + "x" * 43,
    ],
)
def test_a_missing_malformed_or_unknown_key_is_401(api: Api, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with api.client() as http:
        answer = http.get("/v1/key", headers=headers)
    _is_problem(answer, 401, "unauthorized")
    assert answer.headers["www-authenticate"].startswith("Bearer")


def test_a_key_with_a_wrong_secret_is_401(api: Api) -> None:
    real = api.key(keys.READ)
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    with api.client(forged) as http:
        _is_problem(http.get("/v1/key"), 401, "unauthorized")


def test_a_revoked_key_is_refused_on_its_next_request(api: Api) -> None:
    key = api.key(keys.READ)
    with api.client(key) as http:
        assert http.get("/v1/key").status_code == 200
        with session_scope(api.engine) as session:
            keys.revoke(session, key)
        _is_problem(http.get("/v1/key"), 401, "unauthorized")


@pytest.mark.parametrize(
    ("scopes", "needed", "allowed"),
    [
        ((keys.READ,), keys.READ, True),
        ((keys.SUBMIT,), keys.READ, False),
        ((keys.ADMIN,), keys.READ, True),
        ((keys.READ,), keys.ADMIN, False),
        ((keys.READ, keys.SUBMIT), keys.ADMIN, False),
        ((keys.ADMIN,), keys.ADMIN, True),
    ],
)
def test_scopes(api: Api, scopes: tuple[str, ...], needed: str, allowed: bool) -> None:
    key = api.key(*scopes)
    with api.client(key) as http:
        answer = http.get("/v1/key", params={"scope": needed})
    if allowed:
        assert answer.status_code == 200
        assert answer.json()["scopes"] == list(scopes)
    else:
        body = _is_problem(answer, 403, "forbidden-scope")
        assert body["required_scope"] == needed


def test_a_key_over_its_limit_gets_429_with_retry_after(api: Api) -> None:
    key = api.key(keys.READ, rate_per_minute=3)
    other = api.key(keys.READ, rate_per_minute=3)
    with api.client(key) as http:
        # Unless the minute turns during the test (then the first request of the new one is
        # allowed again), the fourth request of the minute is refused.
        start = time.time()
        answers = [http.get("/v1/key") for _ in range(4)]
    if int(start // 60) != int(time.time() // 60):
        pytest.skip("the minute turned during the test")
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    body = _is_problem(answers[3], 429, "rate-limited")
    assert body["limit_per_minute"] == 3
    assert 1 <= int(answers[3].headers["retry-after"]) <= 60
    with api.client(other) as http:
        assert http.get("/v1/key").status_code == 200  # each key has its own count


def test_the_limit_is_shared_by_every_server_on_the_database(engine: sa.Engine) -> None:
    # Two apps (as two workers or hosts would be) on one database: one count.
    prices = load_pricing()
    with (
        start_server(create_app(engine, prices=prices)) as a,
        start_server(create_app(engine, prices=prices)) as b,
    ):
        api_a, api_b = Api(a.url, engine), Api(b.url, engine)
        key = api_a.key(keys.READ, rate_per_minute=2)
        start = time.time()
        with api_a.client(key) as one, api_b.client(key) as two:
            codes = [one.get("/v1/key").status_code, two.get("/v1/key").status_code]
            codes.append(one.get("/v1/key").status_code)
    if int(start // 60) != int(time.time() // 60):
        pytest.skip("the minute turned during the test")
    assert codes == [200, 200, 429]
    with session_scope(engine) as session:
        assert session.scalar(sa.select(sa.func.sum(ApiRequestCount.count))) == 3


def _counted(engine: sa.Engine, key: str) -> int:
    key_id = key.split("_")[1]
    with session_scope(engine) as session:
        total = session.scalar(
            sa.select(sa.func.sum(ApiRequestCount.count)).where(ApiRequestCount.key_id == key_id)
        )
    return int(total or 0)


def test_only_a_valid_keys_requests_spend_its_limit(api: Api) -> None:
    # The count is taken in the statement that reads the key (ratelimit.admit): a request with
    # the right id and a wrong secret must not count, or anyone who saw a key id in a log could
    # exhaust the key's limit; a revoked key's requests do not count either. A request of a
    # valid key that lacks the route's scope does count (it was made).
    key = api.key(keys.READ, rate_per_minute=100)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with api.client(forged) as http:
        for _ in range(3):
            _is_problem(http.get("/v1/key"), 401, "unauthorized")
    assert _counted(api.engine, key) == 0
    with api.client(key) as http:
        assert http.get("/v1/key").status_code == 200
        answer = http.post(
            "/v1/users/someone/grants", json={"amount": 1}, headers={"Idempotency-Key": "k"}
        )
        _is_problem(answer, 403, "forbidden-scope")
    assert _counted(api.engine, key) == 2
    with session_scope(api.engine) as session:
        keys.revoke(session, key)
    with api.client(key) as http:
        _is_problem(http.get("/v1/key"), 401, "unauthorized")
    assert _counted(api.engine, key) == 2


def test_request_counts_commit_without_waiting_for_the_disk_and_money_does(
    engine: sa.Engine,
) -> None:
    # The counter engine's commits may lag (a crash forgets the last counts); every other
    # engine's, which move credits, must wait for the disk.
    counter = make_counter_engine(engine)
    if engine.dialect.name == "sqlite":
        assert counter is engine
        return
    try:
        with counter.connect() as connection:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
            assert connection.connection.dbapi_connection.autocommit is True
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
            assert connection.connection.dbapi_connection.autocommit is False
    finally:
        counter.dispose()
    # Options the database URL carries survive (regression: connect_args replaced them).
    with_options = engine.url.update_query_dict({"options": "-c statement_timeout=5000"})
    source = sa.create_engine(with_options)
    counter = make_counter_engine(source)
    try:
        with counter.connect() as connection:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
    finally:
        counter.dispose()
        source.dispose()


def test_unknown_routes_are_problems_and_problem_types_are_described(api: Api) -> None:
    with api.client() as http:
        _is_problem(http.get("/v1/nothing-here"), 404, "not-found")
        described = http.get("/problems/rate-limited").json()
        assert described["status"] == 429 and "Retry-After" in described["description"]
        _is_problem(http.get("/problems/no-such-problem"), 404, "not-found")


def test_a_body_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Declares 100 MB and sends none of it: the answer comes at once.
        sock.sendall(
            b"POST /v1/key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413")
    assert "/problems/body-too-large" in answer


def test_a_streamed_body_over_the_limit_is_cut_off(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, over the 1 MiB default, without a Content-Length

    with api.client(api.key(keys.READ)) as http:
        answer = http.post("/v1/key", content=chunks())
    _is_problem(answer, 413, "body-too-large")


def test_the_openapi_document_names_the_bearer_scheme(api: Api) -> None:
    with api.client() as http:
        document = http.get("/openapi.json").json()
    assert "/v1/key" in document["paths"]
    schemes = document["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


# --- the event log ------------------------------------------------------------------------------


def _events(engine: sa.Engine, generation_id: int) -> list[tuple[int, str, str | None]]:
    with session_scope(engine) as session:
        rows = session.scalars(
            sa.select(GenerationEvent)
            .where(GenerationEvent.generation_id == generation_id)
            .order_by(GenerationEvent.id)
        )
        return [(e.attempt, e.status, e.error_code) for e in rows]


def test_every_transition_appends_its_event(engine: sa.Engine) -> None:
    prices = load_pricing()
    with session_scope(engine) as session:
        ledger.grant(session, "ann", 100, "g1")
    with session_scope(engine) as session:
        row = gens.submit(
            session, user_id="ann", model="demo/pixel-sketch", input={"prompt": "a"}, prices=prices
        )
        gid = row.id
    with session_scope(engine) as session:
        gens.claim_pending(session, limit=10, batch_key_fn=lambda rows: "b1")
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="r1", prices=prices)
    with session_scope(engine) as session:
        gens.fail(session, gid, code="provider_error", message="boom")
    with session_scope(engine) as session:
        gens.requeue(session, gid)
    assert _events(engine, gid) == [
        (1, "pending", None),
        (1, "queued", None),
        (1, "running", None),
        (1, "failed", "provider_error"),
        (2, "pending", None),
    ]
    # A transition that changes nothing (the second refund path) appends nothing.
    with session_scope(engine) as session:
        gens.fail(session, gid, code="x", message="y")  # pending: it fails the new attempt
    with session_scope(engine) as session:
        assert gens.fail(session, gid, code="x", message="again") is False
    assert [s for _, s, _ in _events(engine, gid)][-1] == "failed"
    assert len(_events(engine, gid)) == 6


def test_a_refused_submit_leaves_no_event(engine: sa.Engine) -> None:
    prices = load_pricing()
    with session_scope(engine) as session:
        ledger.grant(session, "bob", 1, "g1")
    with pytest.raises(gens.CannotAfford), session_scope(engine) as session:
        gens.submit(
            session, user_id="bob", model="demo/pixel-sketch", input={"prompt": "a"}, prices=prices
        )
    with session_scope(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(GenerationEvent)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Generation)) == 0


# --- regressions found by the fuzz test -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "options"),
    [
        ("GET", "/v1/generations", {"params": {"user": "a\x00b"}}),
        ("GET", "/v1/users/a%00b/credits", {}),
        ("GET", "/v1/users/a%00b/ledger", {}),
        ("POST", "/v1/generations", {"json": {"user": "a\x00", "model": "m/n", "input": {}}}),
    ],
)
def test_a_nul_in_a_user_id_is_refused_not_a_server_error(
    api: Api, method: str, path: str, options: dict[str, object]
) -> None:
    # Each answered 500: PostgreSQL refuses a NUL in a string ("A string literal cannot contain
    # NUL"), and the user id reached a query before any check (the submit's backlog count too).
    with api.client(api.key(keys.ADMIN)) as http:
        answer = http.request(method, path, **options)  # type: ignore[arg-type]
    body = _is_problem(answer, 422, "invalid-request")
    assert body["errors"]
    with session_scope(api.engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Generation)) == 0


def test_a_ledger_cursor_past_64_bits_is_refused_not_a_server_error(api: Api) -> None:
    # SQLite cannot bind an integer over 64 bits: the decoded cursor answered 500 there.
    import base64

    with session_scope(api.engine) as session:
        ledger.grant(session, "ann", 5, "g1")
    for digits in ("9" * 19, "9" * 40, "0"):
        cursor = base64.urlsafe_b64encode(f"le:{digits}".encode()).decode().rstrip("=")
        with api.client(api.key(keys.READ)) as http:
            answer = http.get("/v1/users/ann/ledger", params={"cursor": cursor})
        _is_problem(answer, 422, "invalid-request")


def test_an_unexpected_failure_is_a_500_problem_and_the_connection_lives_on(
    engine: sa.Engine,
) -> None:
    # Starlette's outermost handler answered the 500 and then re-raised, so the server dropped
    # the connection: the client's next request on it failed with a reset.
    app = create_app(engine, prices=load_pricing())

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with start_server(app) as handle, Api(handle.url, engine).client() as http:
        _is_problem(http.get("/broken"), 500, "internal-error")
        assert http.get("/healthz").json() == {"status": "ok"}


def test_a_request_head_that_never_completes_is_cut_off(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn's keep-alive timeout starts only after a response: a client that opened
    # connections and sent half a head held them for ever, and a thousand of them took every
    # connection a worker allows (its next clients got 503).
    monkeypatch.setenv("AI_HANDLER_API_BODY_TIMEOUT_S", "1")
    with start_server(create_app(engine, prices=load_pricing())) as handle:
        host, port = handle.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: unfinished
            started = time.monotonic()
            assert sock.recv(1024) == b""  # the server closed it
            assert time.monotonic() - started < 5
        with Api(handle.url, engine).client() as http:
            assert http.get("/healthz").status_code == 200


def test_a_request_head_past_its_limit_is_not_buffered(engine: sa.Engine) -> None:
    from ai_handler_dagster.api.server import MAX_HEAD_BYTES

    with start_server(create_app(engine, prices=load_pricing())) as handle:
        host, port = handle.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            closed = False
            try:
                for _ in range(4 * MAX_HEAD_BYTES // 4096):
                    sock.sendall(b"X-Pad: " + b"p" * 4089 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if not closed:
                try:
                    closed = sock.recv(1024) == b""
                except ConnectionResetError:
                    closed = True  # closed with unread data: the peer sees a reset
        assert closed


def test_a_bad_setting_stops_the_app_at_start(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backlog limit out of range made every submit answer 500 while the service looked up.
    from ai_handler_dagster.settings import ConfigError

    monkeypatch.setenv("AI_HANDLER_API_MAX_BACKLOG_PER_USER", str(10**9))
    with pytest.raises(ConfigError, match="AI_HANDLER_API_MAX_BACKLOG_PER_USER"):
        create_app(engine, prices=load_pricing())


def test_admit_many_answers_each_key_as_if_checked_one_after_another(engine: sa.Engine) -> None:
    # The admitter checks the keys presented meanwhile with one statement: each request gets
    # its own count, in order, and only a valid key's requests count.
    with session_scope(engine) as session:
        tight, _ = keys.create(session, name="tight", scopes=[keys.READ], rate_per_minute=2)
        other, _ = keys.create(session, name="other", scopes=[keys.READ])
        gone, _ = keys.create(session, name="gone", scopes=[keys.READ])
        keys.revoke(session, gone)
    forged = tight[:-4] + ("AAAA" if not tight.endswith("AAAA") else "BBBB")
    unknown = "aih_" + "0" * 12 + tight[len("aih_") + 12 :]
    assert keys.parse(unknown) is not None  # well formed, but no such key
    presented = [tight, forged, other, tight, "not a key", gone, unknown, tight, other]
    start = time.time()
    with make_counter_engine(engine).connect() as connection:
        answers = ratelimit.admit_many(connection, presented, default_limit=100)
        connection.commit()
    if int(start // 60) != int(time.time() // 60):
        pytest.skip("the minute turned during the test")
    named = [a.caller.name if a.caller else None for a in answers]
    assert named == ["tight", None, "other", "tight", None, None, None, "tight", "other"]
    verdicts = [(a.verdict.count, a.verdict.allowed) if a.verdict else None for a in answers]
    assert verdicts == [
        (1, True),
        None,
        (1, True),
        (2, True),
        None,
        None,
        None,
        (3, False),
        (2, True),
    ]
    assert _counted(engine, tight) == 3 and _counted(engine, other) == 2
    assert _counted(engine, gone) == 0


def test_concurrent_requests_of_one_key_spend_its_limit_exactly(api: Api) -> None:
    # Requests that arrive together are checked in one batch; the key's limit still admits
    # exactly as many as it allows, whichever batch each request landed in.
    key = api.key(keys.READ, rate_per_minute=10)
    start = time.time()
    codes = race(24, lambda _i: _get_key(api, key))
    if int(start // 60) != int(time.time() // 60):
        pytest.skip("the minute turned during the test")
    assert sorted(codes) == [200] * 10 + [429] * 14, codes
    assert _counted(api.engine, key) == 24


def _get_key(api: Api, key: str) -> int:
    with api.client(key) as http:
        return http.get("/v1/key").status_code
