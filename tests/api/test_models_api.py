"""The priced models and quotes over real HTTP, on SQLite and PostgreSQL.

Proves: ``GET /v1/models`` lists every model of the worker's price table with its kind, its
figures (decimals exact, as strings) and what an input holds by default and at most, for every
kind of price; ``POST /v1/quote`` answers the hold that a submit of the same request then
places, refuses what a submit refuses with the same problem types (404 unpriced, 422 with the
field), needs the read scope, and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, GenerationEvent, Hold, LedgerEntry
from ai_handler_dagster.pricing import parse_pricing
from tests.support.api import Api, running_api
from tests.support.db import emptied

PROBLEM = "application/problem+json"

TABLE = """
[models."acme/fixed"]
credits = 7

[models."acme/fixed:v2"]
credits = 9

[models."acme/metered"]
credits_per_second = 0.5
max_seconds = 61

[models."acme/images"]
credits_per_output = 3
outputs_field = "n"
outputs_default = 2
outputs_max = 5

[models."acme/text"]
credits_per_input_token = 0.01
credits_per_output_token = 0.25
max_tokens_field = "max_tokens"
max_tokens_default = 10
max_tokens_max = 100
max_input_tokens = 300

[models."deployment:acme/private"]
credits = 4
"""


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    with running_api(emptied(db_url), prices=parse_pricing(TABLE, source="test table")) as up:
        yield up


def _written(engine: sa.Engine) -> tuple[int, ...]:
    with session_scope(engine) as session:
        return tuple(
            int(session.scalar(sa.select(sa.func.count()).select_from(t)) or 0)
            for t in (Generation, Hold, LedgerEntry, GenerationEvent)
        )


def test_the_models_are_the_price_table_with_their_holds(api: Api) -> None:
    with api.client(api.key(keys.READ)) as http:
        answer = http.get("/v1/models")
    assert answer.status_code == 200, answer.text
    shown = {m["model"]: m for m in answer.json()["models"]}
    assert list(shown) == sorted(shown)  # in the table's sorted order
    assert set(shown) == {
        "acme/fixed",
        "acme/fixed:v2",
        "acme/metered",
        "acme/images",
        "acme/text",
        "deployment:acme/private",
    }
    kinds = {name: m["price_kind"] for name, m in shown.items()}
    assert kinds == {
        "acme/fixed": "fixed",
        "acme/fixed:v2": "fixed",
        "acme/metered": "metered",
        "acme/images": "per_output",
        "acme/text": "per_token",
        "deployment:acme/private": "fixed",
    }
    # Holds from the table's figures: fixed N; metered ceil(0.5 * 61); per output 3 x n;
    # per token ceil(0.01 * 300 + 0.25 * max_tokens).
    holds = {name: (m["default_hold"], m["max_hold"]) for name, m in shown.items()}
    assert holds["acme/fixed"] == (7, 7) and holds["acme/fixed:v2"] == (9, 9)
    assert holds["acme/metered"] == (31, 31)
    assert holds["acme/images"] == (3 * 2, 3 * 5)
    assert holds["acme/text"] == (3 + 3, 3 + 25)  # ceil(3 + 2.5) = 6, 3 + 25 = 28
    assert shown["acme/images"]["count_field"] == {"name": "n", "default": 2, "max": 5}
    assert shown["acme/text"]["count_field"] == {"name": "max_tokens", "default": 10, "max": 100}
    assert shown["acme/fixed"]["count_field"] is None
    assert shown["acme/metered"]["rates"]["credits_per_second"] == "0.5"
    assert shown["acme/metered"]["rates"]["max_seconds"] == "61"
    assert shown["acme/text"]["rates"]["credits_per_input_token"] == "0.01"
    assert shown["acme/text"]["rates"]["max_input_tokens"] == 300
    assert shown["acme/fixed"]["rates"]["credits"] == 7
    assert all(m["description"] for m in shown.values())


def test_models_and_quotes_need_the_read_scope(api: Api) -> None:
    with api.client(api.key(keys.SUBMIT)) as http:
        for answer in (
            http.get("/v1/models"),
            http.post("/v1/quote", json={"model": "acme/fixed", "input": {}}),
        ):
            assert answer.status_code == 403
            assert answer.json()["type"] == "/problems/forbidden-scope"
    with api.client() as http:
        assert http.get("/v1/models").status_code == 401


@pytest.mark.parametrize(
    ("model", "input"),
    [
        ("acme/fixed", {"prompt": "x"}),
        ("acme/fixed:v2", {}),  # a version priced on its own
        ("acme/fixed:v3", {}),  # a version without its own price: the model's
        ("acme/metered", {"seconds": 999}),
        ("acme/images", {}),
        ("acme/images", {"n": 4}),
        ("acme/text", {"max_tokens": 100}),
        ("acme/text", {"max_tokens": 1}),
        ("deployment:acme/private", {"a": [1, 2]}),
    ],
)
def test_a_quote_is_the_hold_a_submit_then_places(
    api: Api, model: str, input: dict[str, Any]
) -> None:
    with session_scope(api.engine) as session:
        ledger.grant(session, "ann", 1000, "g1")
    with api.client(api.key(keys.READ)) as http:
        before = _written(api.engine)
        quoted = http.post("/v1/quote", json={"model": model, "input": input})
        assert quoted.status_code == 200, quoted.text
        assert _written(api.engine) == before  # a quote writes nothing
    with api.client(api.key(keys.SUBMIT)) as http:
        submitted = http.post(
            "/v1/generations", json={"user": "ann", "model": model, "input": input}
        )
    assert submitted.status_code == 202, submitted.text
    with session_scope(api.engine) as session:
        row = session.get(Generation, submitted.json()["id"])
        assert row is not None
        held = row.amount_held
    body = quoted.json()
    assert body["hold"] == held
    assert body["model"] == model and body["price_kind"] and body["description"]


# (case, body, status, problem slug, offending field)
REFUSED: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("unpriced", {"model": "other/model", "input": {}}, 404, "unknown-model", None),
    ("unpriced deployment", {"model": "deployment:acme/fixed", "input": {}}, 404,
     "unknown-model", None),
    ("malformed ref", {"model": "acme", "input": {}}, 422, "invalid-request", "model"),
    ("count too high", {"model": "acme/images", "input": {"n": 6}}, 422, "invalid-request",
     "input"),
    ("count not whole", {"model": "acme/text", "input": {"max_tokens": 1.5}}, 422,
     "invalid-request", "input"),
    ("not clean text", {"model": "acme/fixed", "input": {"p": "\x00"}}, 422, "invalid-request",
     "input"),
    ("extra field", {"model": "acme/fixed", "input": {}, "user": "ann"}, 422,
     "invalid-request", "user"),
    ("input not object", {"model": "acme/fixed", "input": "x"}, 422, "invalid-request", "input"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "slug", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_a_quote_refuses_what_a_submit_refuses(
    api: Api, body: dict[str, Any], status: int, slug: str, field: str | None
) -> None:
    with session_scope(api.engine) as session:
        ledger.grant(session, "ann", 1000, "g1")
    before = _written(api.engine)
    with api.client(api.key(keys.READ, keys.SUBMIT)) as http:
        answers = [http.post("/v1/quote", json=body)]
        if "user" not in body:  # the same request as a submit (a quote has no user field)
            answers.append(http.post("/v1/generations", json={"user": "ann", **body}))
    for answer in answers:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith(PROBLEM)
        problem = answer.json()
        assert problem["type"] == f"/problems/{slug}"
        if field is not None:
            assert [e["field"] for e in problem["errors"]] == [field]
    assert _written(api.engine) == before
