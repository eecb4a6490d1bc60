"""Generation transitions move status and money together, once, on both databases.

Proves, on real SQLite and PostgreSQL: ``submit`` refuses each kind of bad request with a message
naming the problem and writes nothing, and deduplicates by request_id (also under a concurrent
race); ``claim_pending`` hands each pending row to exactly one batch; ``start_attempt`` holds the
price once per attempt (op retries reuse it) or fails the generation with
``insufficient_credits``; a per-output or per-token price is held from the input, and a count out
of range is refused at submit (nothing written) or fails an inserted row with
``invalid_request``; ``succeed`` captures the fixed, metered, per-output or per-token charge,
never more than the hold; ``fail`` refunds exactly once even when several refund paths race;
``requeue`` starts a fresh attempt with its own hold; predictions cannot be adopted twice; a
rolled-back transaction leaves neither status nor money behind; and ``verify`` notices a
generation whose hold disagrees with its status.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger, priorities
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation, GenerationEvent, Hold, LedgerEntry
from ai_handler_dagster.pricing import PriceBook, load_pricing, parse_pricing
from tests.support.db import emptied, migrated_database, race

T = TypeVar("T")
SKETCH = "demo/pixel-sketch"  # 5 credits per output, one by default (hold 5)
HAIKU = "demo/haiku-text"  # per token, hold 60 with the default max_tokens
#: The two older kinds, on the same model names: fixed 5 credits, and 2 credits/s up to 30 s.
FIXED_AND_METERED = parse_pricing(
    f'[models."{SKETCH}"]\ncredits = 5\n'
    f'[models."{HAIKU}"]\ncredits_per_second = 2\nmax_seconds = 30\n',
    source="test table",
)
OUTPUT = {
    "key": "outputs/1/a1/0.png",
    "uri": "s3://bucket/outputs/1/a1/0.png",
    "size": 1234,
    "sha256": "ab" * 32,
    "content_type": "image/png",
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """One migrated database per dialect for this module (see tests/support/db.py)."""
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    """The module's database, emptied for this test."""
    return emptied(db_url)


@pytest.fixture(scope="module")
def prices() -> PriceBook:
    return load_pricing()


def tx(engine: sa.Engine, fn: Callable[[Session], T]) -> T:
    with session_scope(engine) as session:
        return fn(session)


def fund(engine: sa.Engine, user: str = "alice", amount: int = 100) -> None:
    tx(engine, lambda s: ledger.grant(s, user, amount, f"fund-{user}-{amount}"))


def submit(engine: sa.Engine, prices: PriceBook, model: str = SKETCH, **kw: Any) -> Generation:
    kw.setdefault("user_id", "alice")
    kw.setdefault("input", {"prompt": "a red fox"})
    return tx(engine, lambda s: gens.submit(s, model=model, prices=prices, **kw))


def inserted(engine: sa.Engine, model: str = SKETCH, user: str = "alice") -> int:
    """A pending row as an application writes it straight into the table: nothing held yet."""

    def add(session: Session) -> int:
        row = Generation(user_id=user, model=model, input={"prompt": "inserted"}, status="pending")
        session.add(row)
        session.flush()
        return row.id

    return tx(engine, add)


def start(engine: sa.Engine, prices: PriceBook, gid: int, run_id: str = "run-1") -> Generation:
    return tx(engine, lambda s: gens.start_attempt(s, gid, run_id=run_id, prices=prices))


def row(engine: sa.Engine, gid: int) -> Generation:
    return tx(engine, lambda s: gens.get(s, gid))


def count(engine: sa.Engine, model: type[Any]) -> int:
    return tx(engine, lambda s: s.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def balance(engine: sa.Engine, user: str = "alice") -> ledger.Balance:
    return tx(engine, lambda s: ledger.balance(s, user))


def assert_consistent(engine: sa.Engine) -> None:
    problems = tx(engine, lambda s: [*ledger.verify(s), *gens.verify(s)])
    assert [str(p) for p in problems] == []


# --- submit -----------------------------------------------------------------------------------


def test_submit_creates_a_pending_row_and_holds_its_price(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    created = submit(engine, prices, request_id="req-1")
    assert (created.status, created.attempt, created.user_id, created.model) == (
        "pending",
        1,
        "alice",
        SKETCH,
    )
    assert created.input == {"prompt": "a red fox"}
    assert balance(engine) == ledger.Balance(balance=100, held=5, available=95)
    assert created.hold_id is not None and created.amount_held == 5
    # The same request again (a client retry) returns the same row, holding nothing more.
    assert submit(engine, prices, request_id="req-1").id == created.id
    with pytest.raises(gens.InvalidRequest, match="request_id 'req-1' was already used"):
        submit(engine, prices, request_id="req-1", input={"prompt": "a blue fox"})
    assert count(engine, Generation) == 1
    assert balance(engine).held == 5
    # The run takes the submit's hold over (one hold for the attempt, not two), extended to
    # outlive the run however long the request waited.
    run_lifetime = timedelta(days=2)
    started = tx(
        engine,
        lambda s: gens.start_attempt(
            s, created.id, run_id="run-1", prices=prices, hold_ttl=run_lifetime
        ),
    )
    assert (started.status, started.hold_id) == ("running", created.hold_id)
    assert count(engine, Hold) == 1
    hold = tx(engine, lambda s: s.get(Hold, created.hold_id))
    assert hold is not None and hold.expires_at - hold.created_at > timedelta(days=1)
    assert_consistent(engine)


def test_a_user_cannot_queue_more_than_the_credits_cover(
    engine: sa.Engine, prices: PriceBook
) -> None:
    """Regression: submit checked the balance but not what the user's pending requests would
    hold, so a user with 5 credits could queue any number of requests of 5."""
    fund(engine, amount=5)
    submit(engine, prices)
    with pytest.raises(gens.CannotAfford, match="0 available, 5 needed"):
        submit(engine, prices, input={"prompt": "a second fox"})
    assert count(engine, Generation) == 1
    # Racing submits: exactly as many as the credits cover get in, the others write nothing.
    fund(engine, user="bob", amount=15)
    results = race(
        8,
        lambda i: _submitted_or_refused(engine, prices, user_id="bob", input={"prompt": f"{i}"}),
    )
    assert sorted(results) == ["refused"] * 5 + ["submitted"] * 3
    assert balance(engine, "bob") == ledger.Balance(balance=15, held=15, available=0)
    assert count(engine, Generation) == 4
    assert_consistent(engine)


def _submitted_or_refused(engine: sa.Engine, prices: PriceBook, **kw: Any) -> str:
    try:
        submit(engine, prices, **kw)
    except gens.CannotAfford:
        return "refused"
    return "submitted"


def test_a_hold_that_ended_while_the_request_waited_fails_it(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    created = submit(engine, prices)
    later = created.created_at + timedelta(days=1)
    tx(engine, lambda s: ledger.expire(s, now=later))
    started = start(engine, prices, created.id)
    assert (started.status, started.error_code) == ("failed", "deadline_exceeded")
    assert balance(engine) == ledger.Balance(balance=100, held=0, available=100)


BIG = "x" * (64 * 1024)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"user_id": "nobody"}, "unknown user 'nobody'"),
        ({"user_id": ""}, "user_id must be a non-empty string"),
        ({"model": "pixel-sketch"}, "is not 'owner/name'"),
        ({"model": "demo/pixel sketch"}, "is not 'owner/name'"),
        ({"model": 42}, "model must be a string"),
        ({"model": "demo/unknown"}, "'demo/unknown' has no price"),
        ({"input": ["a", "list"]}, "input must be a JSON object, got list"),
        ({"input": "a prompt"}, "input must be a JSON object, got str"),
        ({"input": {1: "x"}}, "non-string key 1"),
        ({"input": {"seed": float("nan")}}, r"input\['seed'\] is nan"),
        ({"input": {"when": object()}}, "not a JSON value"),
        (
            {"input": {"prompt": "bell\x07"}},
            r"input\['prompt'\] contains control character U\+0007",
        ),
        ({"input": {"prompt": "nul\x00"}}, "control character U\\+0000"),
        ({"input": {"prompt": "bad \ud800 half"}}, "not valid UTF-8"),
        ({"input": {"tags": ["ok", "esc\x1b"]}}, r"input\['tags'\]\[1\] contains control"),
        ({"input": {"prompt": BIG}}, "bytes as JSON; the limit is 65536"),
        ({"input": {"deep": json.loads("[" * 40 + "]" * 40)}}, "nested more than"),
        ({"request_id": "bad\nid"}, "request_id contains control character"),
    ],
)
def test_submit_refuses_bad_requests_and_writes_nothing(
    engine: sa.Engine, prices: PriceBook, overrides: dict[str, Any], message: str
) -> None:
    fund(engine)
    with pytest.raises(gens.InvalidRequest, match=message):
        submit(engine, prices, **overrides)
    assert count(engine, Generation) == 0


def test_submit_accepts_newlines_tabs_and_unicode(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    text = "line one\n\tline two — café 🦊"
    created = submit(engine, prices, input={"prompt": text, "n": 2, "x": None, "ok": True})
    assert row(engine, created.id).input["prompt"] == text


def test_submit_refuses_what_the_user_cannot_afford(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine, amount=59)
    with pytest.raises(gens.CannotAfford, match="59 available, 60 needed") as info:
        submit(engine, prices, model=HAIKU)
    # Callers may catch it as either kind.
    assert isinstance(info.value, gens.InvalidRequest)
    assert isinstance(info.value, ledger.InsufficientCredits)
    assert count(engine, Generation) == 0
    assert submit(engine, prices, model=SKETCH).status == "pending"


def test_concurrent_submits_with_one_request_id_make_one_row(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    results = race(8, lambda i: submit(engine, prices, request_id="same").id)
    assert len(set(results)) == 1, results
    assert count(engine, Generation) == 1


def test_repeats_of_a_request_the_user_can_afford_once_are_replays_not_402(
    engine: sa.Engine, prices: PriceBook
) -> None:
    # Regression: a repeat that waited on the account lock while the first request committed
    # read the account afterwards, with the first request's hold, and was refused for lack of
    # credits instead of answering the first request's row. The request_id is read again once
    # the lock is held.
    fund(engine, amount=5)  # one SKETCH request
    for round_ in range(5):
        results = race(8, lambda i, r=round_: submit(engine, prices, request_id=f"once-{r}").id)
        assert all(isinstance(r, int) for r in results), results
        assert len(set(results)) == 1
        gens_id = results[0]
        tx(engine, lambda s, g=gens_id: gens.fail(s, g, code="test", message="free the credits"))
    assert count(engine, Generation) == 5
    assert_consistent(engine)


def test_a_rolled_back_submission_leaves_nothing_in_the_session(
    engine: sa.Engine, prices: PriceBook
) -> None:
    # Regression: the row submission returns is attached without an ORM insert, so a rollback
    # did not expunge it: the session kept a row that did not exist, and on SQLite (which gives
    # the id to the next insert) the next submit in the session failed to attach its own.
    fund(engine)

    def send(session: Session) -> Generation:
        return gens.submit(session, user_id="alice", model=SKETCH, input={"p": 1}, prices=prices)

    with Session(engine, expire_on_commit=False) as session:
        first = send(session)
        session.rollback()
        assert first not in session
        with session.begin_nested() as savepoint:
            second = send(session)
            savepoint.rollback()
        assert second not in session
        third = send(session)
        session.commit()
        assert third in session
    assert count(engine, Generation) == 1 and balance(engine).held == 5
    assert_consistent(engine)


def test_max_waiting_refuses_a_user_with_that_many_waiting(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine, amount=1000)
    fund(engine, user="bob", amount=1000)
    for _ in range(3):
        submit(engine, prices, max_waiting=3)
    with pytest.raises(gens.TooManyWaiting, match="'alice' has 3 generations waiting") as info:
        submit(engine, prices, max_waiting=3)
    assert info.value.limit == 3
    assert count(engine, Generation) == 3 and balance(engine).held == 3 * 5
    # Another user's backlog is their own; without a limit nothing is counted.
    assert submit(engine, prices, user_id="bob", max_waiting=3).status == "pending"
    assert submit(engine, prices).status == "pending"
    assert_consistent(engine)


def test_a_submission_says_whether_it_created_the_row(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)

    def send(session: Session) -> gens.Submission:
        return gens.submission(
            session,
            user_id="alice",
            model=SKETCH,
            input={"prompt": "x"},
            prices=prices,
            request_id="once",
        )

    first, again = tx(engine, send), tx(engine, send)
    assert first.created and not again.created
    assert first.generation.id == again.generation.id
    # The returned row is the stored one, column for column, without a second read.
    stored = row(engine, first.generation.id)
    for column in Generation.__table__.columns:
        assert getattr(first.generation, column.key) == getattr(stored, column.key), column.key


# --- claim and start --------------------------------------------------------------------------


def test_claim_pending_takes_the_oldest_rows_once(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    ids = [submit(engine, prices).id for _ in range(5)]

    def key(rows: Any) -> str:
        return f"batch-{rows[0].id}"

    first = tx(engine, lambda s: gens.claim_pending(s, limit=3, batch_key_fn=key))
    assert [r.id for r in first] == ids[:3]
    assert {(r.status, r.batch_key) for r in first} == {("queued", f"batch-{ids[0]}")}
    assert all(r.queued_at is not None for r in first)
    second = tx(engine, lambda s: gens.claim_pending(s, limit=3, batch_key_fn=key))
    assert [r.id for r in second] == ids[3:]
    assert tx(engine, lambda s: gens.claim_pending(s, limit=3, batch_key_fn=key)) == []
    with pytest.raises(ValueError, match="limit"):
        tx(engine, lambda s: gens.claim_pending(s, limit=0, batch_key_fn=key))


def test_concurrent_claims_never_share_a_row(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    for _ in range(20):
        submit(engine, prices)

    def claim(i: int) -> list[int]:
        rows = tx(engine, lambda s: gens.claim_pending(s, limit=4, batch_key_fn=lambda _: f"b{i}"))
        return [r.id for r in rows]

    results = race(8, claim)
    claimed = [gid for r in results if isinstance(r, list) for gid in r]
    assert sorted(claimed) == sorted(set(claimed))
    assert len(claimed) == 20


def test_start_attempt_holds_once_per_attempt(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    running = start(engine, prices, gid)
    assert (running.status, running.amount_held, running.dagster_run_id) == ("running", 5, "run-1")
    held = tx(engine, lambda s: s.get_one(Hold, running.hold_id))
    assert (held.idempotency_key, held.generation_id, held.amount) == (
        gens.hold_key(gid, 1),
        gid,
        5,
    )
    # An op retry, then a re-executed run: same hold, the run id moves to the new run.
    assert start(engine, prices, gid).hold_id == running.hold_id
    again = start(engine, prices, gid, run_id="run-2")
    assert (again.hold_id, again.dagster_run_id) == (running.hold_id, "run-2")
    assert balance(engine) == ledger.Balance(balance=100, held=5, available=95)
    assert count(engine, Hold) == 1
    assert_consistent(engine)


def test_start_attempt_fails_what_cannot_be_afforded(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine, amount=70)
    # Rows an application inserted: each affordable alone, not both.
    first, second = inserted(engine, model=HAIKU), inserted(engine, model=HAIKU)
    assert start(engine, prices, first).status == "running"
    refused = start(engine, prices, second)
    assert (refused.status, refused.error_code, refused.hold_id) == (
        "failed",
        "insufficient_credits",
        None,
    )
    assert "10 available, 60 needed" in (refused.error_message or "")
    assert refused.finished_at is not None
    assert balance(engine) == ledger.Balance(balance=70, held=60, available=10)
    # Terminal rows are returned unchanged.
    assert start(engine, prices, second).status == "failed"
    assert_consistent(engine)


def test_start_attempt_fails_a_model_that_lost_its_price(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = inserted(engine)
    only_haiku = parse_pricing('[models."demo/haiku-text"]\ncredits = 1\n', source="test table")
    refused = tx(engine, lambda s: gens.start_attempt(s, gid, run_id="r", prices=only_haiku))
    assert (refused.status, refused.error_code) == ("failed", "unpriced_model")
    assert balance(engine).held == 0


def test_status_and_money_commit_together(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = inserted(engine)
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="r", prices=prices)
        raise RuntimeError("crash before commit")
    assert row(engine, gid).status == "pending"
    assert count(engine, Hold) == 0
    assert balance(engine).held == 0


# --- succeed ----------------------------------------------------------------------------------


def test_succeed_captures_the_fixed_price(engine: sa.Engine) -> None:
    prices = FIXED_AND_METERED
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    done = tx(
        engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=9.0, prices=prices)
    )
    assert (done.status, done.amount_charged, done.outputs) == ("succeeded", 5, [OUTPUT])
    assert done.finished_at is not None and done.error_code is None
    assert balance(engine) == ledger.Balance(balance=95, held=0, available=95)
    # Idempotent: a retried op changes nothing.
    tx(engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=9.0, prices=prices))
    assert balance(engine).balance == 95
    assert_consistent(engine)


def test_succeed_captures_the_metered_charge(engine: sa.Engine) -> None:
    prices = FIXED_AND_METERED
    fund(engine)
    gid = submit(engine, prices, model=HAIKU).id
    assert start(engine, prices, gid).amount_held == 60
    done = tx(
        engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=3.2, prices=prices)
    )
    assert done.amount_charged == 7  # ceil(3.2 * 2)
    assert balance(engine) == ledger.Balance(balance=93, held=0, available=93)
    capture = tx(
        engine,
        lambda s: s.scalars(sa.select(LedgerEntry).where(LedgerEntry.kind == "capture")).one(),
    )
    assert (capture.amount, capture.balance_delta, capture.held_delta) == (7, -7, -60)
    assert_consistent(engine)


def test_succeed_refuses_bad_outputs_and_wrong_states(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    with pytest.raises(gens.InvalidTransition, match="pending"):
        tx(engine, lambda s: gens.succeed(s, gid, outputs=[], predict_time=None, prices=prices))
    start(engine, prices, gid)
    bad = {**OUTPUT, "sha256": "nothex"}
    with pytest.raises(ValueError, match="sha256"):
        tx(engine, lambda s: gens.succeed(s, gid, outputs=[bad], predict_time=None, prices=prices))
    assert row(engine, gid).status == "running"
    assert balance(engine).held == 5


def test_succeed_refuses_to_charge_for_nothing(engine: sa.Engine, prices: PriceBook) -> None:
    """Regression: a prediction that succeeded with no output (null, "", [], [""]) was
    captured at the full price with zero outputs stored."""
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    with pytest.raises(gens.EmptyOutput, match="no output to store"):
        tx(engine, lambda s: gens.succeed(s, gid, outputs=[], predict_time=1.0, prices=prices))
    assert row(engine, gid).status == "running"
    assert balance(engine) == ledger.Balance(balance=100, held=5, available=95)
    # A model whose price allows an empty output is charged as usual.
    allowing = parse_pricing(f'[models."{SKETCH}"]\ncredits = 5\nallow_empty_output = true\n')
    done = tx(engine, lambda s: gens.succeed(s, gid, outputs=[], predict_time=1.0, prices=allowing))
    assert (done.status, done.amount_charged, done.outputs) == ("succeeded", 5, [])
    assert_consistent(engine)


# --- counted prices (per output, per token) ----------------------------------------------------

COUNTED = parse_pricing(
    '[models."img/multi"]\ncredits_per_output = 5\noutputs_field = "num_outputs"\n'
    "outputs_default = 1\noutputs_max = 4\n"
    '[models."llm/chat"]\ncredits_per_input_token = 0.01\ncredits_per_output_token = 0.5\n'
    'max_tokens_field = "max_tokens"\nmax_tokens_default = 64\nmax_tokens_max = 512\n'
    "max_input_tokens = 1000\n",
    source="test table",
)


def outputs(n: int) -> list[dict[str, Any]]:
    return [{**OUTPUT, "key": f"outputs/1/a1/{i}.png"} for i in range(n)]


@pytest.mark.parametrize(
    ("model", "extra", "hold"),
    [
        ("img/multi", {}, 5),
        ("img/multi", {"num_outputs": 4}, 20),
        ("llm/chat", {}, 42),  # ceil(0.01 * 1000 + 0.5 * 64)
        ("llm/chat", {"max_tokens": 512}, 266),
    ],
)
def test_submit_holds_a_counted_price_from_the_input(
    engine: sa.Engine, model: str, extra: dict[str, Any], hold: int
) -> None:
    fund(engine, amount=300)
    created = submit(engine, COUNTED, model=model, input={"prompt": "p", **extra})
    assert created.amount_held == hold
    assert balance(engine).held == hold
    assert_consistent(engine)


@pytest.mark.parametrize(
    ("model", "field", "bad"),
    [
        ("img/multi", "num_outputs", 5),
        ("img/multi", "num_outputs", 0),
        ("img/multi", "num_outputs", "2"),
        ("img/multi", "num_outputs", 2.5),
        ("llm/chat", "max_tokens", 513),
        ("llm/chat", "max_tokens", True),
    ],
)
def test_submit_refuses_a_count_out_of_range_and_writes_nothing(
    engine: sa.Engine, model: str, field: str, bad: Any
) -> None:
    """Regression guard: a count above the declared maximum must be refused, not held at a
    larger amount than the table declares (or at the default) and run."""
    fund(engine, amount=10_000)
    with pytest.raises(gens.InvalidRequest, match=f"input field '{field}' must be a whole number"):
        submit(engine, COUNTED, model=model, input={"prompt": "p", field: bad})
    assert count(engine, Generation) == 0
    assert balance(engine) == ledger.Balance(balance=10_000, held=0, available=10_000)


def test_start_attempt_fails_an_inserted_row_whose_count_is_out_of_range(
    engine: sa.Engine,
) -> None:
    """Regression guard: a row an application wrote straight into the table, asking for more
    outputs than the price allows, fails with invalid_request and holds nothing."""
    fund(engine)

    def add(session: Session, payload: dict[str, Any]) -> int:
        new = Generation(user_id="alice", model="img/multi", input=payload, status="pending")
        session.add(new)
        session.flush()
        return new.id

    bad = tx(engine, lambda s: add(s, {"prompt": "p", "num_outputs": 9}))
    good = tx(engine, lambda s: add(s, {"prompt": "p", "num_outputs": 3}))
    refused = start(engine, COUNTED, bad)
    assert (refused.status, refused.error_code) == ("failed", "invalid_request")
    assert "'num_outputs'" in (refused.error_message or "")
    assert balance(engine).held == 0
    assert start(engine, COUNTED, good).amount_held == 15
    assert balance(engine).held == 15
    assert_consistent(engine)


@pytest.mark.parametrize(
    ("asked", "stored", "charged"),
    [(3, 3, 15), (3, 2, 10), (1, 1, 5)],
)
def test_succeed_charges_per_output_stored(
    engine: sa.Engine, asked: int, stored: int, charged: int
) -> None:
    fund(engine)
    gid = submit(engine, COUNTED, model="img/multi", input={"prompt": "p", "num_outputs": asked}).id
    assert start(engine, COUNTED, gid).amount_held == 5 * asked
    done = tx(
        engine,
        lambda s: gens.succeed(
            s, gid, outputs=outputs(stored), predict_time=1.0, metrics={}, prices=COUNTED
        ),
    )
    assert done.amount_charged == charged
    assert balance(engine) == ledger.Balance(balance=100 - charged, held=0, available=100 - charged)
    assert_consistent(engine)


@pytest.mark.parametrize(
    ("metrics", "charged"),
    [
        ({"input_token_count": 6, "output_token_count": 10, "predict_time": 0.1}, 6),
        ({"input_token_count": 3000, "output_token_count": 64}, 42),  # capped at the hold
        ({"predict_time": 0.1}, 42),  # no token counts: the hold
        (None, 42),  # an AwaitedPrediction pickled before metrics existed
    ],
)
def test_succeed_charges_per_token_from_the_reported_counts(
    engine: sa.Engine, metrics: dict[str, Any] | None, charged: int
) -> None:
    fund(engine)
    gid = submit(engine, COUNTED, model="llm/chat").id
    assert start(engine, COUNTED, gid).amount_held == 42
    done = tx(
        engine,
        lambda s: gens.succeed(
            s, gid, outputs=[OUTPUT], predict_time=0.1, metrics=metrics, prices=COUNTED
        ),
    )
    assert done.amount_charged == charged
    assert balance(engine).balance == 100 - charged
    assert_consistent(engine)


def test_succeed_charges_the_hold_when_the_price_changed_under_a_counted_input(
    engine: sa.Engine,
) -> None:
    """Regression guard: a price table whose maximum shrank mid-run must not fail finalize; the
    generation is charged what was held, as for a time that is no time."""
    fund(engine)
    gid = submit(engine, COUNTED, model="img/multi", input={"prompt": "p", "num_outputs": 4}).id
    start(engine, COUNTED, gid)
    smaller = parse_pricing(
        '[models."img/multi"]\ncredits_per_output = 5\noutputs_field = "num_outputs"\n'
        "outputs_default = 1\noutputs_max = 2\n"
    )
    done = tx(
        engine,
        lambda s: gens.succeed(s, gid, outputs=outputs(4), predict_time=None, prices=smaller),
    )
    assert done.amount_charged == 20
    assert_consistent(engine)


# --- fail, refunds and requeue ----------------------------------------------------------------


def test_fail_refunds_once(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    assert tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="boom")) is True
    assert tx(engine, lambda s: gens.fail(s, gid, code="run_failed", message="again")) is False
    failed = row(engine, gid)
    assert (failed.status, failed.error_code, failed.error_message) == (
        "failed",
        "prediction_failed",
        "boom",
    )
    assert balance(engine) == ledger.Balance(balance=100, held=0, available=100)
    with pytest.raises(gens.InvalidTransition, match="failed"):
        tx(engine, lambda s: gens.succeed(s, gid, outputs=[], predict_time=None, prices=prices))
    assert_consistent(engine)


def test_fail_after_success_changes_nothing(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    tx(engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices))
    assert tx(engine, lambda s: gens.fail(s, gid, code="run_failed", message="late")) is False
    assert row(engine, gid).status == "succeeded"
    assert balance(engine).balance == 95


def test_fail_can_cancel_and_works_before_any_hold(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    assert tx(
        engine, lambda s: gens.fail(s, gid, code="run_failed", message="x", status="canceled")
    )
    assert row(engine, gid).status == "canceled"
    with pytest.raises(ValueError, match="status"):
        tx(engine, lambda s: gens.fail(s, gid, code="x", message="y", status="succeeded"))


def test_racing_refund_paths_refund_exactly_once(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    results = race(
        8, lambda i: tx(engine, lambda s: gens.fail(s, gid, code="run_failed", message=f"path {i}"))
    )
    assert sorted(results, key=str) == [False] * 7 + [True]
    releases = tx(
        engine,
        lambda s: s.scalar(sa.select(sa.func.count()).where(LedgerEntry.kind == "release")),
    )
    assert releases == 1
    assert balance(engine) == ledger.Balance(balance=100, held=0, available=100)
    assert_consistent(engine)


def test_requeue_starts_a_new_attempt_with_its_own_hold(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    first = start(engine, prices, gid)
    tx(engine, lambda s: gens.record_prediction(s, gid, "pred-1", SKETCH, "v1"))
    tx(engine, lambda s: gens.fail(s, gid, code="provider_unavailable", message="503"))
    fresh = tx(engine, lambda s: gens.requeue(s, gid))
    with pytest.raises(gens.InvalidTransition, match="pending"):
        tx(engine, lambda s: gens.requeue(s, gid))
    assert (fresh.status, fresh.attempt) == ("pending", 2)
    assert (fresh.hold_id, fresh.prediction_id, fresh.error_code, fresh.dagster_run_id) == (
        None,
    ) * 4
    second = start(engine, prices, gid, run_id="run-2")
    assert second.hold_id != first.hold_id
    hold2 = tx(engine, lambda s: s.get_one(Hold, second.hold_id))
    assert hold2.idempotency_key == gens.hold_key(gid, 2)
    # The prediction id of the old attempt is free again for the new one to record.
    tx(engine, lambda s: gens.record_prediction(s, gid, "pred-2", SKETCH, "v1"))
    tx(engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices))
    assert balance(engine) == ledger.Balance(balance=95, held=0, available=95)
    assert_consistent(engine)


def test_requeue_refuses_unfinished_and_optionally_accepts_succeeded(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    with pytest.raises(gens.InvalidTransition, match="running"):
        tx(engine, lambda s: gens.requeue(s, gid))
    tx(engine, lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices))
    with pytest.raises(gens.InvalidTransition, match="succeeded"):
        tx(engine, lambda s: gens.requeue(s, gid))
    again = tx(engine, lambda s: gens.requeue(s, gid, include_succeeded=True))
    assert (again.status, again.attempt, again.outputs, again.amount_charged) == (
        "pending",
        2,
        None,
        0,
    )
    with pytest.raises(gens.UnknownGeneration):
        tx(engine, lambda s: gens.requeue(s, 999_999))


# --- predictions ------------------------------------------------------------------------------


def test_a_prediction_belongs_to_one_generation(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    a, b = submit(engine, prices).id, submit(engine, prices).id
    start(engine, prices, a)
    start(engine, prices, b)
    recorded = tx(engine, lambda s: gens.record_prediction(s, a, "p-1", "demo/pixel-sketch", "v9"))
    assert (recorded.prediction_id, recorded.prediction_model, recorded.prediction_version) == (
        "p-1",
        "demo/pixel-sketch",
        "v9",
    )
    tx(engine, lambda s: gens.record_prediction(s, a, "p-1", "demo/pixel-sketch", "v9"))
    with pytest.raises(gens.InvalidTransition, match=f"already belongs to generation {a}"):
        tx(engine, lambda s: gens.record_prediction(s, b, "p-1", None, None))
    with pytest.raises(gens.InvalidTransition, match="already has prediction p-1"):
        tx(engine, lambda s: gens.record_prediction(s, a, "p-2", None, None))
    tx(engine, lambda s: gens.fail(s, b, code="run_failed", message="x"))
    with pytest.raises(gens.InvalidTransition, match="should be canceled"):
        tx(engine, lambda s: gens.record_prediction(s, b, "p-3", None, None))
    assert row(engine, b).prediction_id is None


# --- reading and verifying --------------------------------------------------------------------


def test_as_dict_is_json_ready(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = submit(engine, prices, request_id="r-9").id
    data = gens.as_dict(row(engine, gid))
    assert json.loads(json.dumps(data))["request_id"] == "r-9"
    assert data["status"] == "pending" and data["created_at"].endswith("+00:00")


def test_verify_notices_a_status_that_disagrees_with_its_hold(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = submit(engine, prices).id
    start(engine, prices, gid)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET status = 'failed' WHERE id = :g"), {"g": gid})
    problems = [str(p) for p in tx(engine, gens.verify)]
    hold_id = row(engine, gid).hold_id
    assert problems == [f"generation {gid}: failed but its hold {hold_id} is still pending"]


# --- submissions (many requests, few statements) ----------------------------------------------


def batch(
    engine: sa.Engine, prices: PriceBook, requests: list[gens.SubmitRequest], **kw: Any
) -> list[gens.Submission | gens.InvalidRequest]:
    return tx(engine, lambda s: gens.submissions(s, requests, prices=prices, **kw))


def req(user: str = "alice", model: str = SKETCH, **kw: Any) -> gens.SubmitRequest:
    kw.setdefault("input", {"prompt": "a red fox"})
    return gens.SubmitRequest(user_id=user, model=model, **kw)


def test_submissions_answer_each_request_as_submit_would_one_after_another(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine, amount=12)  # two SKETCH requests of 5, not three
    fund(engine, user="bob", amount=100)
    answers = batch(
        engine,
        prices,
        [
            req(),
            req("bob"),
            req(model="no-slash"),
            req(),
            req("carol"),
            req(model="demo/unpriced"),
            req(),  # the earlier two hold 10 of alice's 12
            req("bob", input=["not", "an", "object"]),
            req("bob", priority=99),
            req("bob", model=HAIKU),
        ],
    )
    kinds = [type(a).__name__ for a in answers]
    assert kinds == [
        "Submission",
        "Submission",
        "InvalidRequest",
        "Submission",
        "UnknownUser",
        "UnknownModel",
        "CannotAfford",
        "InvalidRequest",
        "InvalidRequest",
        "Submission",
    ], [str(a) for a in answers]
    refused = answers[6]
    assert isinstance(refused, gens.CannotAfford)
    assert (refused.available, refused.needed) == (2, 5)
    assert answers[2].field == "model" and answers[8].field == "priority"  # type: ignore[union-attr]
    created = [a.generation for a in answers if isinstance(a, gens.Submission)]
    assert all(a.created for a in answers if isinstance(a, gens.Submission))
    assert len({g.id for g in created}) == 4
    assert count(engine, Generation) == 4
    assert balance(engine).held == 10 and balance(engine, "bob").held == 5 + 60
    assert_consistent(engine)


def test_submissions_write_what_submit_writes(engine: sa.Engine, prices: PriceBook) -> None:
    # Every column of the generation, its hold, its entry and its first event, whichever path
    # wrote them: the batch's one statement must leave nothing to a default submit sets.
    fund(engine)
    tx(engine, lambda s: priorities.set_ceiling(s, "alice", 5))
    alone = submit(engine, prices, request_id="alone", priority=3, input={"prompt": "same"})
    together = batch(
        engine, prices, [req(request_id="together", priority=3, input={"prompt": "same"})]
    )[0]
    assert isinstance(together, gens.Submission) and together.created

    def stored(session: Session, gid: int) -> dict[str, Any]:
        generation = session.get_one(Generation, gid)
        hold = session.get_one(Hold, generation.hold_id)
        entry = session.scalars(sa.select(LedgerEntry).where(LedgerEntry.hold_id == hold.id)).one()
        event = session.scalars(
            sa.select(GenerationEvent).where(GenerationEvent.generation_id == gid)
        ).one()
        skip = {"id", "request_id", "hold_id", "generation_id", "idempotency_key", "input"}
        skip |= {"created_at", "updated_at", "pending_since", "expires_at", "at"}
        return {
            f"{type(obj).__name__}.{c.key}": getattr(obj, c.key)
            for obj in (generation, hold, entry, event)
            for c in type(obj).__table__.columns
            if c.key not in skip
        }

    first, second = tx(engine, lambda s: (stored(s, alone.id), stored(s, together.generation.id)))
    assert first == second
    # The returned object is the stored row, column for column, without a second read.
    again = row(engine, together.generation.id)
    for column in Generation.__table__.columns:
        assert getattr(together.generation, column.key) == getattr(again, column.key), column.key
    assert_consistent(engine)


def test_submissions_replay_repeats_within_and_across_batches(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine, amount=10)
    first = submit(engine, prices, request_id="earlier")
    answers = batch(
        engine,
        prices,
        [
            req(request_id="earlier"),
            req(request_id="new"),
            req(request_id="new"),  # the batch's own repeat: answered with the row just made
            req(request_id="new", input={"prompt": "another"}),
            req(request_id="earlier", input={"prompt": "another"}),
        ],
    )
    assert [type(a).__name__ for a in answers] == [
        "Submission",
        "Submission",
        "Submission",
        "RequestConflict",
        "RequestConflict",
    ]
    replay, made, repeat = answers[0], answers[1], answers[2]
    assert isinstance(replay, gens.Submission) and not replay.created
    assert replay.generation.id == first.id
    assert isinstance(made, gens.Submission) and made.created
    assert isinstance(repeat, gens.Submission) and not repeat.created
    assert repeat.generation.id == made.generation.id
    conflicts = [a for a in answers[3:] if isinstance(a, gens.RequestConflict)]
    assert [c.generation_id for c in conflicts] == [made.generation.id, first.id]
    assert count(engine, Generation) == 2 and balance(engine).held == 10
    assert_consistent(engine)


def test_submissions_count_their_own_requests_against_max_waiting(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine, amount=1000)
    submit(engine, prices)
    answers = batch(engine, prices, [req(), req(), req()], max_waiting=2)
    assert [type(a).__name__ for a in answers] == ["Submission", "TooManyWaiting", "TooManyWaiting"]
    assert count(engine, Generation) == 2
    assert_consistent(engine)


def test_concurrent_submissions_never_deadlock_or_overspend(
    engine: sa.Engine, prices: PriceBook
) -> None:
    # Batches naming the same users in opposite orders lock their accounts in id order, so
    # none waits on another in a cycle; every user can afford exactly three requests.
    users = [f"user-{i}" for i in range(6)]
    for user in users:
        fund(engine, user=user, amount=15)

    def send(i: int) -> list[str]:
        order = users if i % 2 else users[::-1]
        answers = batch(engine, prices, [req(u, input={"n": i}) for u in order for _ in range(2)])
        return [type(a).__name__ for a in answers]

    results = race(8, send)
    assert all(isinstance(r, list) for r in results), results
    flat = [kind for r in results for kind in r]
    assert flat.count("Submission") == 3 * len(users)
    assert flat.count("CannotAfford") == len(flat) - 3 * len(users)
    for user in users:
        assert balance(engine, user).held == 15
    assert_consistent(engine)


def test_a_batch_that_loses_a_request_id_race_still_accepts_the_rest(
    engine: sa.Engine, prices: PriceBook
) -> None:
    # Another transaction has written bob's request "contested" and not committed: the batch
    # cannot see that row, so its write meets the unique index, waits for the other
    # transaction, and fails once it commits. Nothing of the write is kept, and each request
    # is then submitted alone: the contested one is refused, its neighbours are accepted.
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: no write can wait on another's row")
    fund(engine, amount=10)
    fund(engine, user="bob")
    answers: list[list[gens.Submission | gens.InvalidRequest]] = []
    with Session(engine) as other:
        gens.submission(
            other, user_id="bob", model=SKETCH, input={}, prices=prices, request_id="contested"
        )
        sender = threading.Thread(
            target=lambda: answers.append(
                batch(engine, prices, [req(request_id="contested"), req(), req()])
            )
        )
        sender.start()
        waiting = sa.text(
            # Only the batch can wait for another transaction here (its query text may not be
            # shown: the statement carries its arrays).
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND wait_event = 'transactionid'"
        )
        deadline = time.monotonic() + 30
        with engine.connect() as watcher:
            while not watcher.execute(waiting).scalar() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert watcher.execute(waiting).scalar() == 1, "the batch's write never waited"
        other.commit()
        sender.join(timeout=60)
    # alice affords two: the contested request, a conflict, holds nothing, so both others are
    # accepted (regression: only the accepted requests were resubmitted, and a refusal counted
    # against the contested one's hold stood).
    assert [type(a).__name__ for a in answers[0]] == [
        "RequestConflict",
        "Submission",
        "Submission",
    ]
    assert count(engine, Generation) == 3
    assert balance(engine).held == 10 and balance(engine, "bob").held == 5
    assert_consistent(engine)


def test_a_repeat_in_a_batch_whose_first_was_refused_is_answered_in_its_place(
    engine: sa.Engine, prices: PriceBook
) -> None:
    # Regression: a repeat of a request_id earlier in the batch was moved to the end of the
    # batch. When the first was refused, the repeat is a new request, and it must be held
    # before the requests after it: alice affords two, so the last one is the refusal.
    fund(engine, amount=10)
    answers = batch(
        engine,
        prices,
        [
            req(model="demo/unpriced", request_id="x"),
            req(request_id="x"),
            req(input={"prompt": "y"}),
            req(input={"prompt": "z"}),
        ],
    )
    assert [type(a).__name__ for a in answers] == [
        "UnknownModel",
        "Submission",
        "Submission",
        "CannotAfford",
    ]
    assert balance(engine).held == 10
    assert_consistent(engine)
