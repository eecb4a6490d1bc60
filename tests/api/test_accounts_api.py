"""Credits, the statement and grants over real HTTP, on SQLite and PostgreSQL.

Proves: ``GET /v1/users/{user}/credits`` answers what the ledger holds and 404 for a user without
an account; the statement pages newest first through every entry kind (grant, hold, capture,
release, expire) with each entry's hold and generation, every entry on exactly one page even
while new entries arrive, within a bounded ``limit``; a grant needs an admin key and an
``Idempotency-Key``, 16 concurrent repeats write one entry and answer the same, another body with
the key is 409, another API key's same Idempotency-Key is its own grant; every refusal (scope,
amount, reason, key, user) writes no account and no entry.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys
from ai_handler_dagster.api.routes.accounts import MAX_PAGE, page_query
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Account, LedgerEntry, utcnow
from tests.support.api import Api
from tests.support.db import race

PROBLEM = "application/problem+json"


def _problem(answer: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"/problems/{slug}"
    return body


def _written(engine: sa.Engine) -> tuple[int, int]:
    """Accounts and ledger entries in the database."""
    with session_scope(engine) as session:
        accounts = session.scalar(sa.select(sa.func.count()).select_from(Account))
        entries = session.scalar(sa.select(sa.func.count()).select_from(LedgerEntry))
    return int(accounts or 0), int(entries or 0)


def _every_kind(engine: sa.Engine, user: str) -> None:
    """A grant, then holds that end captured, released and expired, and one still pending."""
    with session_scope(engine) as session:
        ledger.grant(session, user, 100, f"{user}-g1", memo="welcome")
        captured = ledger.hold(session, user, 10, f"{user}-h1", generation_id=101)
        released = ledger.hold(session, user, 20, f"{user}-h2", generation_id=102)
        expiring = ledger.hold(
            session, user, 5, f"{user}-h3", generation_id=103, now=utcnow() - timedelta(hours=3)
        )
        ledger.hold(session, user, 7, f"{user}-h4", generation_id=104)
        ledger.capture(session, captured.id, 8)
        ledger.release(session, released.id, "canceled by the user")
        assert [h.id for h in ledger.expire(session)] == [expiring.id]


# --- credits ------------------------------------------------------------------------------------


def test_credits_are_what_the_ledger_holds(api: Api) -> None:
    _every_kind(api.engine, "ann")
    with session_scope(api.engine) as session:
        expected = ledger.balance(session, "ann")
    with api.client(api.key(keys.READ)) as http:
        answer = http.get("/v1/users/ann/credits")
    assert answer.status_code == 200
    assert answer.json() == {
        "user": "ann",
        "balance": expected.balance,
        "held": expected.held,
        "available": expected.available,
    }
    # 100 granted, 8 spent, the pending hold of 7 still held.
    assert (expected.balance, expected.held, expected.available) == (92, 7, 85)


def test_a_user_without_an_account_is_404(api: Api) -> None:
    with api.client(api.key(keys.READ)) as http:
        for path in ("/v1/users/nobody/credits", "/v1/users/nobody/ledger"):
            body = _problem(http.get(path), 404, "no-account")
            assert "nobody" in body["detail"]
    assert _written(api.engine) == (0, 0)


# --- the statement ------------------------------------------------------------------------------


def _walk(http: httpx.Client, user: str, limit: int) -> list[list[dict[str, Any]]]:
    pages = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        answer = http.get(f"/v1/users/{user}/ledger", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append(body["entries"])
        if body["next_cursor"] is None:
            assert "next" not in body["links"]
            return pages
        assert body["links"]["next"].startswith(f"/v1/users/{user}/ledger?cursor=")
        params = {"limit": limit, "cursor": body["next_cursor"]}


def test_the_statement_pages_through_every_entry_kind_newest_first(api: Api) -> None:
    _every_kind(api.engine, "ann")
    _every_kind(api.engine, "bob")  # another user's entries stay out of ann's statement
    with session_scope(api.engine) as session:
        account = session.scalars(sa.select(Account).where(Account.user_id == "ann")).one()
        stored = session.scalars(
            sa.select(LedgerEntry)
            .where(LedgerEntry.account_id == account.id)
            .order_by(LedgerEntry.id.desc())
        ).all()
    with api.client(api.key(keys.READ)) as http:
        pages = _walk(http, "ann", limit=3)
    assert [len(p) for p in pages] == [3, 3, 2]  # a grant, 4 holds, 3 endings
    entries = [e for page in pages for e in page]
    assert [e["id"] for e in entries] == [e.id for e in stored]
    assert {e["kind"] for e in entries} == {"grant", "hold", "capture", "release", "expire"}
    by_key = {e["idempotency_key"]: e for e in entries}
    grant = by_key["grant:ann-g1"]
    assert (grant["amount"], grant["balance_delta"], grant["held_delta"]) == (100, 100, 0)
    assert grant["reason"] == "welcome" and grant["hold_id"] is None
    assert grant["generation_id"] is None
    hold = by_key["hold:ann-h1"]
    capture = next(e for e in entries if e["kind"] == "capture")
    assert capture["hold_id"] == hold["hold_id"] and capture["generation_id"] == 101
    assert (capture["amount"], capture["balance_delta"], capture["held_delta"]) == (8, -8, -10)
    release = next(e for e in entries if e["kind"] == "release")
    assert release["generation_id"] == 102 and release["reason"] == "canceled by the user"
    expiry = next(e for e in entries if e["kind"] == "expire")
    assert expiry["generation_id"] == 103 and expiry["amount"] == 5
    assert all(e["at"].endswith("Z") or "+00:00" in e["at"] for e in entries)


def test_pages_stay_stable_while_new_entries_arrive(api: Api) -> None:
    with session_scope(api.engine) as session:
        for i in range(7):
            ledger.grant(session, "ann", i + 1, f"old-{i}")
    seen: list[int] = []
    with api.client(api.key(keys.READ)) as http:
        first = http.get("/v1/users/ann/ledger", params={"limit": 3}).json()
        seen += [e["id"] for e in first["entries"]]
        # New grants land between the first page and the next ones.
        with session_scope(api.engine) as session:
            for i in range(4):
                ledger.grant(session, "ann", 50, f"new-{i}")
        cursor = first["next_cursor"]
        while cursor is not None:
            page = http.get("/v1/users/ann/ledger", params={"limit": 3, "cursor": cursor}).json()
            seen += [e["id"] for e in page["entries"]]
            cursor = page["next_cursor"]
        # The newest first page now starts with the new entries.
        top = http.get("/v1/users/ann/ledger", params={"limit": 4}).json()["entries"]
    assert seen == list(range(7, 0, -1))  # each old entry once, in order, none new
    assert [e["idempotency_key"] for e in top] == [f"grant:new-{i}" for i in (3, 2, 1, 0)]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "query.limit"),
        ({"limit": MAX_PAGE + 1}, "query.limit"),
        ({"limit": "ten"}, "query.limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "bGU6LTE"}, "cursor"),  # "le:-1"
    ],
)
def test_a_bad_limit_or_cursor_is_422(api: Api, params: dict[str, Any], field: str) -> None:
    _every_kind(api.engine, "ann")
    before = _written(api.engine)
    with api.client(api.key(keys.READ)) as http:
        body = _problem(http.get("/v1/users/ann/ledger", params=params), 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == [field]
    assert _written(api.engine) == before


def test_a_statement_page_is_one_index_range_scan(engine: sa.Engine) -> None:
    """Regression: with only an index on account_id, PostgreSQL sorted every entry of the
    account for each page."""
    statement = page_query(1, 100, 51).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")  # tiny tables here
            rows = connection.exec_driver_sql(f"EXPLAIN {statement}")
            plan = "\n".join(r[0] for r in rows)
            assert "Index Scan Backward using ix_ledger_entries_account_id_id" in plan, plan
        else:
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}")
            plan = "\n".join(str(r[-1]) for r in rows)
            assert "USING INDEX ix_ledger_entries_account_id_id" in plan, plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan


# --- scopes -------------------------------------------------------------------------------------


def test_scopes_read_reads_and_only_admin_grants(api: Api) -> None:
    _every_kind(api.engine, "ann")
    before = _written(api.engine)
    grant = {"json": {"amount": 5}, "headers": {"Idempotency-Key": "k1"}}
    with api.client(api.key(keys.READ)) as http:
        assert http.get("/v1/users/ann/credits").status_code == 200
        assert http.get("/v1/users/ann/ledger").status_code == 200
        body = _problem(http.post("/v1/users/ann/grants", **grant), 403, "forbidden-scope")
        assert body["required_scope"] == "admin"
        _problem(http.post("/v1/users/new/grants", **grant), 403, "forbidden-scope")
    with api.client(api.key(keys.SUBMIT)) as http:
        _problem(http.get("/v1/users/ann/credits"), 403, "forbidden-scope")
        _problem(http.get("/v1/users/ann/ledger"), 403, "forbidden-scope")
        _problem(http.post("/v1/users/ann/grants", **grant), 403, "forbidden-scope")
    with api.client() as http:
        _problem(http.get("/v1/users/ann/credits"), 401, "unauthorized")
        _problem(http.post("/v1/users/ann/grants", **grant), 401, "unauthorized")
    assert _written(api.engine) == before
    with session_scope(api.engine) as session:
        assert ledger.balance(session, "ann").balance == 92


# --- grants -------------------------------------------------------------------------------------


def test_a_grant_creates_the_account_and_is_on_the_statement(api: Api) -> None:
    with api.client(api.key(keys.ADMIN)) as http:
        answer = http.post(
            "/v1/users/carol/grants",
            json={"amount": 250, "reason": "signup bonus"},
            headers={"Idempotency-Key": "signup-carol"},
        )
        assert answer.status_code == 201, answer.text
        assert "idempotent-replayed" not in answer.headers
        body = answer.json()
        credits = http.get("/v1/users/carol/credits").json()
        entries = http.get("/v1/users/carol/ledger").json()["entries"]
    assert {k: body[k] for k in ("user", "amount", "reason", "idempotency_key")} == {
        "user": "carol",
        "amount": 250,
        "reason": "signup bonus",
        "idempotency_key": "signup-carol",
    }
    assert credits == {"user": "carol", "balance": 250, "held": 0, "available": 250}
    assert [(e["id"], e["kind"], e["reason"]) for e in entries] == [
        (body["entry_id"], "grant", "signup bonus")
    ]
    with session_scope(api.engine) as session:
        assert ledger.verify(session) == []


def test_sixteen_concurrent_grants_with_one_key_write_one_entry(api: Api) -> None:
    key = api.key(keys.ADMIN)
    clients = [api.client(key) for _ in range(16)]
    try:
        answers = race(
            16,
            lambda i: clients[i].post(
                "/v1/users/dana/grants",
                json={"amount": 40, "reason": "promo"},
                headers={"Idempotency-Key": "promo-dana"},
            ),
        )
    finally:
        for client in clients:
            client.close()
    assert all(isinstance(a, httpx.Response) for a in answers), answers
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    assert [r.status_code for r in responses] == [201] * 16, [r.text for r in responses]
    assert len({r.text for r in responses}) == 1  # the same answer, byte for byte
    replayed = [r.headers.get("idempotent-replayed") for r in responses]
    assert replayed.count(None) == 1 and replayed.count("true") == 15
    assert _written(api.engine) == (1, 1)
    with session_scope(api.engine) as session:
        assert ledger.balance(session, "dana").balance == 40
        assert ledger.verify(session) == []


@pytest.mark.parametrize(
    ("user", "body"),
    [
        ("erin", {"amount": 41, "reason": "promo"}),
        ("erin", {"amount": 40, "reason": "another reason"}),
        ("erin", {"amount": 40}),
        ("frank", {"amount": 40, "reason": "promo"}),
    ],
)
def test_the_same_key_with_another_body_is_409(api: Api, user: str, body: dict[str, Any]) -> None:
    key = api.key(keys.ADMIN)
    headers = {"Idempotency-Key": "promo"}
    with api.client(key) as http:
        first = http.post(
            "/v1/users/erin/grants", json={"amount": 40, "reason": "promo"}, headers=headers
        )
        assert first.status_code == 201
        _problem(
            http.post(f"/v1/users/{user}/grants", json=body, headers=headers), 409, "grant-conflict"
        )
        again = http.post(
            "/v1/users/erin/grants", json={"amount": 40, "reason": "promo"}, headers=headers
        )
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert _written(api.engine) == (1, 1)  # frank got no account
    with session_scope(api.engine) as session:
        assert ledger.balance(session, "erin").balance == 40


def test_an_idempotency_key_is_scoped_to_the_calling_api_key(api: Api) -> None:
    request = {"json": {"amount": 10}, "headers": {"Idempotency-Key": "monthly"}}
    with api.client(api.key(keys.ADMIN)) as one, api.client(api.key(keys.ADMIN)) as two:
        a = one.post("/v1/users/gus/grants", **request)
        b = two.post("/v1/users/gus/grants", **request)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["entry_id"] != b.json()["entry_id"]
    with session_scope(api.engine) as session:
        assert ledger.balance(session, "gus").balance == 20


@pytest.mark.parametrize(
    ("path_user", "body", "headers", "field"),
    [
        ("hal", {"amount": 0}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": -5}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": 1.5}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": "10"}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": True}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": ledger.MAX_AMOUNT + 1}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {}, {"Idempotency-Key": "k"}, "amount"),
        ("hal", {"amount": 5, "extra": 1}, {"Idempotency-Key": "k"}, "extra"),
        ("hal", {"amount": 5, "reason": ""}, {"Idempotency-Key": "k"}, "reason"),
        ("hal", {"amount": 5, "reason": "x" * 501}, {"Idempotency-Key": "k"}, "reason"),
        ("hal", {"amount": 5, "reason": "bell\x07"}, {"Idempotency-Key": "k"}, "reason"),
        ("hal", {"amount": 5}, {}, "header.Idempotency-Key"),
        ("hal", {"amount": 5}, {"Idempotency-Key": "k" * 201}, "header.Idempotency-Key"),
        ("hal%09tab", {"amount": 5}, {"Idempotency-Key": "k"}, "user"),
        ("%20", {"amount": 5}, {"Idempotency-Key": "k"}, "user"),
    ],
)
def test_a_refused_grant_writes_nothing(
    api: Api, path_user: str, body: dict[str, Any], headers: dict[str, str], field: str
) -> None:
    with api.client(api.key(keys.ADMIN)) as http:
        answer = http.post(f"/v1/users/{path_user}/grants", json=body, headers=headers)
    problem = _problem(answer, 422, "invalid-request")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert _written(api.engine) == (0, 0)


def test_a_body_that_is_not_json_is_refused_and_writes_nothing(api: Api) -> None:
    with api.client(api.key(keys.ADMIN)) as http:
        answer = http.post(
            "/v1/users/hal/grants",
            content=b"amount=5",
            headers={"Idempotency-Key": "k", "Content-Type": "application/json"},
        )
    _problem(answer, 422, "invalid-request")
    assert _written(api.engine) == (0, 0)
