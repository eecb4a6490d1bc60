"""Submitting, reading and listing generations over real HTTP, on SQLite and PostgreSQL.

Proves: a submit answers 202 with its id, links and ``Location``, holding the price in the same
transaction; every refusal (402, 403, 404, 409, 422, 429) has its problem type and writes
nothing (no generation, hold, ledger entry or event); an ``Idempotency-Key`` is scoped to the
calling key, replays the first answer for the same body (32 racing repeats make one generation
and one hold) and is 409 for another; 32 racing submits on an account that affords k of them
accept exactly k, the rest 402, and the ledger verifies; the status shows credits, errors and
outputs behind presigned links that really fetch the object and expire; the list pages newest
first with no duplicate and no gap while new rows arrive.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger, priorities
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, GenerationEvent, Hold, LedgerEntry
from ai_handler_dagster.devstack.s3 import start_local_s3
from ai_handler_dagster.pricing import load_pricing
from tests.support.api import Api
from tests.support.db import race

PROBLEM = "application/problem+json"
IMAGE = "demo/pixel-sketch"  # 5 credits per output, num_outputs 1..4 (default 1)


def _grant(engine: sa.Engine, user: str, amount: int) -> None:
    with session_scope(engine) as session:
        ledger.grant(session, user, amount, f"grant:{user}:{amount}:{time.monotonic_ns()}")


def _written(engine: sa.Engine) -> dict[str, int]:
    """What a submit writes, counted: generations, holds, hold entries, events."""
    with session_scope(engine) as session:

        def count(table: Any, *where: Any) -> int:
            query = sa.select(sa.func.count()).select_from(table)
            return int(session.scalar(query.where(*where) if where else query) or 0)

        return {
            "generations": count(Generation),
            "holds": count(Hold),
            "entries": count(LedgerEntry, LedgerEntry.kind != "grant"),
            "events": count(GenerationEvent),
        }


def _available(engine: sa.Engine, user: str) -> int:
    with session_scope(engine) as session:
        return ledger.balance(session, user).available


def _problem(answer: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    return body


def _body(user: str = "ann", **extra: Any) -> dict[str, Any]:
    return {"user": user, "model": IMAGE, "input": {"prompt": "a fox"}, **extra}


def _clean(engine: sa.Engine) -> None:
    with session_scope(engine) as session:
        assert ledger.verify(session) == []
        assert gens.verify(session) == []


# --- submit -------------------------------------------------------------------------------------


def test_a_submit_is_accepted_with_its_hold_event_and_links(api: Api) -> None:
    _grant(api.engine, "ann", 100)
    with api.client(api.key(keys.SUBMIT)) as http:
        answer = http.post("/v1/generations", json=_body(input={"prompt": "x", "num_outputs": 3}))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    gid = body["id"]
    assert body == {
        "id": gid,
        "status": "pending",
        "links": {
            "self": f"/v1/generations/{gid}",
            "cancel": f"/v1/generations/{gid}/cancel",
            "events": f"/v1/generations/{gid}/events",
        },
    }
    assert answer.headers["location"] == f"/v1/generations/{gid}"
    assert "idempotent-replayed" not in answer.headers
    with session_scope(api.engine) as session:
        row = session.get(Generation, gid)
        assert row is not None
        assert (row.user_id, row.model, row.input, row.request_id) == (
            "ann",
            IMAGE,
            {"prompt": "x", "num_outputs": 3},
            None,
        )
        assert row.amount_held == 15
        events = session.scalars(sa.select(GenerationEvent.status)).all()
    assert events == ["pending"]
    assert _available(api.engine, "ann") == 85
    assert _written(api.engine) == {"generations": 1, "holds": 1, "entries": 1, "events": 1}


def _set_ceiling(engine: sa.Engine, user: str, value: int) -> None:
    with session_scope(engine) as session:
        priorities.set_ceiling(session, user, value)


# (case, body, headers, key options, status, problem slug, offending field)
REFUSALS: list[tuple[str, dict[str, Any], dict[str, str], dict[str, Any], int, str, str | None]] = [
    ("cannot afford", _body(input={"num_outputs": 4}), {}, {}, 402, "insufficient-credits", None),
    ("no account", _body(user="nobody"), {}, {}, 402, "insufficient-credits", None),
    ("above the user", _body(priority=5), {}, {}, 403, "priority-not-allowed", None),
    ("above the key", _body(user="vip", priority=5), {}, {"max_priority": 2}, 403,
     "priority-not-allowed", None),
    ("unpriced model", _body(model="someone/unpriced"), {}, {}, 404, "unknown-model", None),
    ("bad model ref", _body(model="not a model"), {}, {}, 422, "invalid-request", "model"),
    ("count too high", _body(input={"num_outputs": 9}), {}, {}, 422, "invalid-request", "input"),
    ("bad user id", _body(user="ann\tx"), {}, {}, 422, "invalid-request", "user"),
    ("input not clean", _body(input={"p": "\x00"}), {}, {}, 422, "invalid-request", "input"),
    ("priority range", _body(priority=12), {}, {}, 422, "invalid-request", "priority"),
    ("priority type", _body(priority="1"), {}, {}, 422, "invalid-request", "priority"),
    ("input not object", _body(input=[1]), {}, {}, 422, "invalid-request", "input"),
    ("extra field", _body(request_id="r1"), {}, {}, 422, "invalid-request", "request_id"),
    ("missing field", {"user": "ann", "model": IMAGE}, {}, {}, 422, "invalid-request", "input"),
    ("bad idempotency key", _body(), {"Idempotency-Key": "has space"}, {}, 422,
     "invalid-request", "header.idempotency-key"),
    ("long idempotency key", _body(), {"Idempotency-Key": "k" * 201}, {}, 422,
     "invalid-request", "header.idempotency-key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "key_options", "status", "slug", "field"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_a_refused_submit_writes_nothing(
    api: Api,
    body: dict[str, Any],
    headers: dict[str, str],
    key_options: dict[str, Any],
    status: int,
    slug: str,
    field: str | None,
) -> None:
    _grant(api.engine, "ann", 12)  # 2 images of 5; 4 would need 20
    _grant(api.engine, "vip", 100)
    _set_ceiling(api.engine, "vip", 9)  # the user may ask for 9; a key may cap them lower
    before = _written(api.engine)
    with api.client(api.key(keys.SUBMIT, **key_options)) as http:
        answer = http.post("/v1/generations", json=body, headers=headers)
    problem = _problem(answer, status, slug)
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem
    if slug == "insufficient-credits":
        expected = (12, 20) if body["user"] == "ann" else (0, 5)
        assert (problem["available"], problem["needed"]) == expected
    assert _written(api.engine) == before
    assert _available(api.engine, "ann") == 12
    assert "location" not in answer.headers


def test_submit_needs_the_submit_scope_and_writes_nothing_without_it(api: Api) -> None:
    _grant(api.engine, "ann", 100)
    before = _written(api.engine)
    with api.client(api.key(keys.READ)) as http:
        body = _problem(http.post("/v1/generations", json=_body()), 403, "forbidden-scope")
    assert body["required_scope"] == "submit"
    with api.client() as http:
        _problem(http.post("/v1/generations", json=_body()), 401, "unauthorized")
    assert _written(api.engine) == before


def test_a_deep_backlog_is_429_with_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_HANDLER_API_MAX_BACKLOG_PER_USER", "2")
    monkeypatch.setenv("AI_HANDLER_API_MAX_BACKLOG", "3")
    for user in ("ann", "bob", "cy"):
        _grant(api.engine, user, 100)
    with api.client(api.key(keys.SUBMIT)) as http:
        first = http.post("/v1/generations", json=_body(), headers={"Idempotency-Key": "one"})
        assert first.status_code == 202
        assert http.post("/v1/generations", json=_body()).status_code == 202
        before = _written(api.engine)
        answer = http.post("/v1/generations", json=_body())
        refused = _problem(answer, 429, "backlog-full")
        assert (refused["scope"], refused["limit"]) == ("user", 2)
        assert int(answer.headers["retry-after"]) >= 1
        assert _written(api.engine) == before
        # A replay writes nothing, so the backlog does not refuse it.
        again = http.post("/v1/generations", json=_body(), headers={"Idempotency-Key": "one"})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        # Another user may still submit, up to the global limit of 3 waiting.
        assert http.post("/v1/generations", json=_body("bob")).status_code == 202
        before = _written(api.engine)
        refused = _problem(http.post("/v1/generations", json=_body("cy")), 429, "backlog-full")
        assert (refused["scope"], refused["limit"]) == ("global", 3)
        assert _written(api.engine) == before
    # Generations that left the waiting statuses no longer count.
    with session_scope(api.engine) as session:
        claimed = gens.claim_pending(session, limit=10, batch_key_fn=lambda rows: "b1")
        assert len(claimed) == 3
        for row in claimed:
            gens.fail(session, row.id, code="provider_error", message="boom")
    with api.client(api.key(keys.SUBMIT)) as http:
        assert http.post("/v1/generations", json=_body("cy")).status_code == 202
    _clean(api.engine)


# --- idempotency --------------------------------------------------------------------------------


def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_body(api: Api) -> None:
    _grant(api.engine, "ann", 100)
    key = api.key(keys.SUBMIT)
    key_id = key.split("_")[1]
    with api.client(key) as http:
        headers = {"Idempotency-Key": "order-17"}
        first = http.post("/v1/generations", json=_body(), headers=headers)
        assert first.status_code == 202
        written = _written(api.engine)
        again = http.post("/v1/generations", json=_body(), headers=headers)
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == first.headers["location"]
        assert _written(api.engine) == written
        other = http.post(
            "/v1/generations", json=_body(input={"prompt": "another"}), headers=headers
        )
        problem = _problem(other, 409, "idempotency-conflict")
        assert problem["generation"] == first.json()["id"]
        assert "order-17" in problem["detail"] and "key:" not in problem["detail"]
        assert _written(api.engine) == written
    with session_scope(api.engine) as session:
        row = session.get(Generation, first.json()["id"])
        assert row is not None and row.request_id == f"key:{key_id}:order-17"
    assert _available(api.engine, "ann") == 95
    # Another API key's Idempotency-Key of the same text is its own: a new generation.
    with api.client(api.key(keys.SUBMIT)) as http:
        theirs = http.post("/v1/generations", json=_body(), headers=headers)
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in theirs.headers


def test_32_racing_repeats_of_one_idempotency_key_make_one_generation(api: Api) -> None:
    _grant(api.engine, "ann", 100)
    key = api.key(keys.SUBMIT)

    def submit(_: int) -> httpx.Response:
        with api.client(key) as http:
            return http.post("/v1/generations", json=_body(), headers={"Idempotency-Key": "same"})

    answers = race(32, submit)
    assert all(isinstance(a, httpx.Response) for a in answers), answers
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    assert [a.status_code for a in responses] == [202] * 32, [a.text for a in responses]
    assert len({a.json()["id"] for a in responses}) == 1
    replayed = [a for a in responses if a.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 31
    assert _written(api.engine) == {"generations": 1, "holds": 1, "entries": 1, "events": 1}
    assert _available(api.engine, "ann") == 95
    _clean(api.engine)


def test_32_racing_submits_on_credits_for_k_accept_exactly_k(api: Api) -> None:
    k = 7
    _grant(api.engine, "ann", 5 * k)
    key = api.key(keys.SUBMIT)

    def submit(i: int) -> httpx.Response:
        with api.client(key) as http:
            return http.post(
                "/v1/generations", json=_body(), headers={"Idempotency-Key": f"req-{i}"}
            )

    answers = race(32, submit)
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    assert len(responses) == 32, answers
    codes = sorted(a.status_code for a in responses)
    assert codes == [202] * k + [402] * (32 - k), [
        a.text for a in responses if a.status_code >= 500
    ]
    for refused in (a for a in responses if a.status_code == 402):
        body = _problem(refused, 402, "insufficient-credits")
        assert body["needed"] == 5 and 0 <= body["available"] < 5
    assert _written(api.engine) == {"generations": k, "holds": k, "entries": k, "events": k}
    assert _available(api.engine, "ann") == 0
    _clean(api.engine)


# --- reading ------------------------------------------------------------------------------------


def _run(engine: sa.Engine, gid: int) -> None:
    prices = load_pricing()
    with session_scope(engine) as session:
        gens.claim_pending(session, limit=10, batch_key_fn=lambda rows: f"b{gid}")
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id=f"r{gid}", prices=prices)


def test_a_generation_shows_its_credits_times_and_outputs_behind_expiring_links(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = start_local_s3()
    try:
        monkeypatch.setenv("AI_HANDLER_S3_ENDPOINT_URL", s3.endpoint_url)
        monkeypatch.setenv("AI_HANDLER_S3_BUCKET", s3.bucket)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AI_HANDLER_API_OUTPUT_LINK_TTL_S", "120")
        _grant(api.engine, "ann", 100)
        with api.client(api.key(keys.SUBMIT)) as http:
            answer = http.post("/v1/generations", json=_body(input={"num_outputs": 2}))
        gid = answer.json()["id"]
        with api.client(api.key(keys.READ)) as http:
            pending = http.get(f"/v1/generations/{gid}").json()
        assert pending["status"] == "pending" and pending["credits"] == {"held": 10, "charged": 0}
        assert pending["outputs"] == [] and pending["queued_at"] is None

        # Two outputs in the bucket, recorded as finalize records them.
        payloads = [b"\x89PNG first", b"\x89PNG second"]
        outputs = []
        for index, data in enumerate(payloads):
            key = f"generations/{gid}/a1/{index}.png"
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data, ContentType="image/png")
            outputs.append(
                {
                    "bucket": s3.bucket,
                    "key": key,
                    "uri": f"s3://{s3.bucket}/{key}",
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "content_type": "image/png",
                }
            )
        _run(api.engine, gid)
        with session_scope(api.engine) as session:
            gens.succeed(session, gid, outputs=outputs, predict_time=1.0, prices=load_pricing())
        with api.client(api.key(keys.READ)) as http:
            asked = time.time()
            shown = http.get(f"/v1/generations/{gid}").json()
        assert shown["status"] == "succeeded" and shown["attempt"] == 1
        assert shown["credits"] == {"held": 10, "charged": 10}
        assert shown["user"] == "ann" and shown["model"] == IMAGE
        assert shown["error_code"] is None and shown["output_count"] == 2
        for stamp in ("created_at", "queued_at", "started_at", "finished_at"):
            assert shown[stamp] is not None
        assert [o["index"] for o in shown["outputs"]] == [0, 1]
        for output, data in zip(shown["outputs"], payloads, strict=True):
            assert output["sha256"] == hashlib.sha256(data).hexdigest()
            assert (output["size"], output["content_type"]) == (len(data), "image/png")
            link = urlsplit(output["url"])
            assert f"{link.scheme}://{link.netloc}" == s3.endpoint_url
            query = parse_qs(link.query)
            assert query["X-Amz-Expires"] == ["120"]  # Signature Version 4, the set lifetime
            assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
            assert abs(_epoch(output["expires_at"]) - (asked + 120)) < 30
            fetched = httpx.get(output["url"], timeout=10)
            assert fetched.status_code == 200 and fetched.content == data
    finally:
        s3.stop()


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_failed_generation_shows_its_error_and_its_refund(api: Api) -> None:
    _grant(api.engine, "ann", 100)
    with api.client(api.key(keys.SUBMIT)) as http:
        gid = http.post("/v1/generations", json=_body()).json()["id"]
    _run(api.engine, gid)
    with session_scope(api.engine) as session:
        gens.fail(session, gid, code="provider_error", message="the model crashed")
    with api.client(api.key(keys.READ)) as http:
        shown = http.get(f"/v1/generations/{gid}").json()
    assert (shown["status"], shown["error_code"], shown["error_message"]) == (
        "failed",
        "provider_error",
        "the model crashed",
    )
    assert shown["credits"]["charged"] == 0 and shown["outputs"] == []
    assert _available(api.engine, "ann") == 100


@pytest.mark.parametrize(("path", "status"), [("/v1/generations/999", 404),
                                              ("/v1/generations/0", 422),
                                              (f"/v1/generations/{2**63}", 422),
                                              ("/v1/generations/abc", 422)])  # fmt: skip
def test_an_unknown_or_malformed_id_is_a_problem(api: Api, path: str, status: int) -> None:
    with api.client(api.key(keys.READ)) as http:
        answer = http.get(path)
    _problem(answer, status, "not-found" if status == 404 else "invalid-request")


# --- the list -----------------------------------------------------------------------------------


def _pages(http: httpx.Client, **params: Any) -> list[list[int]]:
    pages: list[list[int]] = []
    answer = http.get("/v1/generations", params=params)
    while True:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append([item["id"] for item in body["items"]])
        if body["links"]["next"] is None:
            assert body["next_cursor"] is None
            return pages
        answer = http.get(body["links"]["next"])


def test_the_list_pages_newest_first_and_filters(api: Api) -> None:
    for user in ("ann", "bob"):
        _grant(api.engine, user, 1000)
    ids: dict[str, list[int]] = {"ann": [], "bob": []}
    with api.client(api.key(keys.SUBMIT)) as http:
        for i in range(7):
            user = "ann" if i % 3 else "bob"
            ids[user].append(http.post("/v1/generations", json=_body(user)).json()["id"])
    _run(api.engine, ids["ann"][0])
    with api.client(api.key(keys.READ)) as http:
        everyone = sorted(ids["ann"] + ids["bob"], reverse=True)
        assert _pages(http, limit=3) == [everyone[:3], everyone[3:6], everyone[6:]]
        assert _pages(http) == [everyone]
        assert _pages(http, user="ann", limit=2) == [
            sorted(ids["ann"], reverse=True)[:2],
            sorted(ids["ann"], reverse=True)[2:4],
        ]
        assert _pages(http, user="ann", status="running") == [[ids["ann"][0]]]
        # _run claimed every pending row into one batch; only the first one started.
        assert _pages(http, status="queued", user="bob") == [sorted(ids["bob"], reverse=True)]
        assert _pages(http, user="nobody") == [[]]
        item = http.get("/v1/generations", params={"limit": 1}).json()["items"][0]
        assert item["id"] == everyone[0] and item["outputs"] is None
        assert item["links"]["cancel"] == f"/v1/generations/{everyone[0]}/cancel"
        for params in ({"limit": 0}, {"limit": 201}, {"status": "lost"}, {"cursor": "nonsense"},
                       {"cursor": "Zy0x"}, {"cursor": "ZzA"}, {"user": ""}):  # fmt: skip
            answer = http.get("/v1/generations", params=params)
            _problem(answer, 422, "invalid-request")


def test_the_list_has_no_duplicate_or_gap_while_new_rows_arrive(api: Api) -> None:
    _grant(api.engine, "ann", 10_000)
    submitter = api.client(api.key(keys.SUBMIT))
    reader = api.client(api.key(keys.READ))
    with submitter, reader:
        existing = [submitter.post("/v1/generations", json=_body()).json()["id"] for _ in range(9)]
        seen: list[int] = []
        answer = reader.get("/v1/generations", params={"limit": 2})
        arrived: list[int] = []
        while True:
            body = answer.json()
            seen.extend(item["id"] for item in body["items"])
            # New submits land between the pages.
            arrived.append(submitter.post("/v1/generations", json=_body()).json()["id"])
            if body["links"]["next"] is None:
                break
            answer = reader.get(body["links"]["next"])
    assert seen == sorted(existing, reverse=True)  # each once, in order, none of the new ones
    assert min(arrived) > max(existing)
