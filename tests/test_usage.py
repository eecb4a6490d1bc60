"""The provider's cost is recorded per attempt, and ``ai-handler usage`` sums it with the
ledger's captures, on both databases.

Proves, on real SQLite and PostgreSQL: ``record_provider_cost`` keeps the cost of an attempt's
finished prediction on its ``create_attempts`` row and mirrors it on the generation, the first
cost recorded stays, a prediction the attempt does not own records nothing, and a requeue clears
the generation's mirror while the old attempt keeps its cost; ended attempts whose prediction
was never priced are listed for reconciliation until priced, and an unpriced model is looked at
once; ``usage_lines`` has one line per
day, user and model with the credits the ledger captured and the costs recorded: a requeued
generation counts both of its attempts, each billed by the provider; a failed generation is
refunded (0 credits) yet cost the provider's seconds (negative margin); an attempt still holding
credits is left out; a model without a provider price counts as cost unknown; the day, user and
model filters select exactly their lines; and the CLI prints the same figures as a table and as
JSON with exact decimal USD.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import cli, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import CreateAttempt
from ai_handler_dagster.pricing import PriceBook, parse_pricing
from ai_handler_dagster.usage import UsageLine, usage_lines
from tests.support.db import emptied, migrated_database

T = TypeVar("T")
SKETCH = "demo/pixel-sketch"  # 5 credits per image; the provider: USD 0.003 per image
HAIKU = "demo/haiku-text"  # per token; the provider: USD 0.05 / 0.25 per million tokens
UPSCALER = "acme/upscaler"  # 3 credits; the provider: per second of nvidia-t4 (USD 0.000225)
FREEBIE = "acme/unpriced"  # 1 credit; no provider price kept
#: The shipped table (which lists nvidia-t4 among its hardware) plus two models of the test's.
TABLE = (
    (resources.files("ai_handler_dagster") / "pricing.toml").read_text(encoding="utf-8")
    + f'\n[models."{UPSCALER}"]\ncredits = 3\n'
    + f'[models."{UPSCALER}".provider]\nhardware = "nvidia-t4"\n'
    + f'[models."{FREEBIE}"]\ncredits = 1\n'
)


def _output(gid: int, attempt: int, index: int) -> dict[str, Any]:
    key = f"generations/{gid}/a{attempt}/{index}.png"
    return {
        "key": key,
        "uri": f"s3://bucket/{key}",
        "size": 10,
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
    return emptied(db_url)


@pytest.fixture(scope="module")
def prices() -> PriceBook:
    return parse_pricing(TABLE, source="test table")


def tx(engine: sa.Engine, fn: Callable[[Session], T]) -> T:
    with session_scope(engine) as session:
        return fn(session)


def run_to_prediction(
    engine: sa.Engine, prices: PriceBook, gid: int, prediction_id: str, model: str
) -> int:
    """Start the generation's current attempt and give it a prediction; returns the attempt."""
    row = tx(engine, lambda s: gens.start_attempt(s, gid, run_id="run", prices=prices))
    tx(engine, lambda s: gens.record_prediction(s, gid, prediction_id, model, "v1"))
    return row.attempt


def finished(
    engine: sa.Engine,
    prices: PriceBook,
    gid: int,
    attempt: int,
    prediction_id: str,
    status: str,
    output: Any,
    metrics: dict[str, Any],
) -> int | None:
    return tx(
        engine,
        lambda s: gens.record_provider_cost(
            s,
            gid,
            attempt=attempt,
            prediction_id=prediction_id,
            prices=prices,
            status=status,
            output=output,
            metrics=metrics,
        ),
    )


def submit(engine: sa.Engine, prices: PriceBook, user: str, model: str, **input: Any) -> int:
    payload = {"prompt": "a fox", **input}
    return tx(
        engine, lambda s: gens.submit(s, user_id=user, model=model, input=payload, prices=prices)
    ).id


def build_usage(engine: sa.Engine, prices: PriceBook) -> dict[str, int]:
    """The scenario every usage test reads (ids by name)."""
    tx(engine, lambda s: ledger.grant(s, "alice", 500, "fund-alice"))
    tx(engine, lambda s: ledger.grant(s, "bob", 500, "fund-bob"))
    ids: dict[str, int] = {}
    # alice: two images, both stored: 10 credits; the provider charged 2 x USD 0.003.
    ids["sketch"] = gid = submit(engine, prices, "alice", SKETCH, num_outputs=2)
    a = run_to_prediction(engine, prices, gid, "p-sketch", SKETCH)
    outputs = ["https://x/0.png", "https://x/1.png"]
    assert finished(engine, prices, gid, a, "p-sketch", "succeeded", outputs, {}) == 6_000_000
    tx(
        engine,
        lambda s: gens.succeed(
            s,
            gid,
            outputs=[_output(gid, a, 0), _output(gid, a, 1)],
            predict_time=1.0,
            prices=prices,
        ),
    )
    # alice: a haiku requeued. Attempt 1 failed after reading 1000 tokens and writing 400
    # (billed: USD 0.00015); attempt 2 succeeded with 100 in, 40 out (USD 0.000015), charged
    # ceil(0.02 x 100 + 0.625 x 40) = 27 credits.
    ids["haiku"] = gid = submit(engine, prices, "alice", HAIKU)
    a = run_to_prediction(engine, prices, gid, "p-haiku-1", HAIKU)
    spent = {"input_token_count": 1000, "output_token_count": 400}
    assert finished(engine, prices, gid, a, "p-haiku-1", "failed", None, spent) == 150_000
    tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="boom"))
    tx(engine, lambda s: gens.requeue(s, gid))
    a = run_to_prediction(engine, prices, gid, "p-haiku-2", HAIKU)
    spent = {"input_token_count": 100, "output_token_count": 40}
    assert finished(engine, prices, gid, a, "p-haiku-2", "succeeded", ["a"], spent) == 15_000
    tx(
        engine,
        lambda s: gens.succeed(
            s, gid, outputs=[_output(gid, a, 0)], predict_time=1.0, prices=prices, metrics=spent
        ),
    )
    # bob: an upscale that failed after 4.4 s on a T4: refunded, but billed USD 0.00099.
    ids["upscale"] = gid = submit(engine, prices, "bob", UPSCALER)
    a = run_to_prediction(engine, prices, gid, "p-up", UPSCALER)
    metrics = {"predict_time": 4.4}
    assert finished(engine, prices, gid, a, "p-up", "failed", None, metrics) == 990_000
    tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="OOM"))
    # bob: a model without a provider price: charged, cost unknown.
    ids["free"] = gid = submit(engine, prices, "bob", FREEBIE)
    a = run_to_prediction(engine, prices, gid, "p-free", FREEBIE)
    assert finished(engine, prices, gid, a, "p-free", "succeeded", ["x"], {}) is None
    tx(
        engine,
        lambda s: gens.succeed(s, gid, outputs=[_output(gid, a, 0)], predict_time=1, prices=prices),
    )
    # bob: one still in flight (its hold pending): not in the report.
    ids["flying"] = gid = submit(engine, prices, "bob", SKETCH)
    a = run_to_prediction(engine, prices, gid, "p-flying", SKETCH)
    return ids


def today() -> date:
    return datetime.now(UTC).date()


def test_the_cost_is_kept_per_attempt_and_mirrored_on_the_generation(
    engine: sa.Engine, prices: PriceBook
) -> None:
    tx(engine, lambda s: ledger.grant(s, "alice", 100, "fund"))
    gid = submit(engine, prices, "alice", UPSCALER)
    a = run_to_prediction(engine, prices, gid, "p-1", UPSCALER)
    # Not this attempt's prediction: nothing recorded.
    assert finished(engine, prices, gid, a, "p-other", "failed", None, {"predict_time": 1}) is None
    assert finished(engine, prices, gid, a, "p-1", "canceled", None, {"predict_time": 2}) == 450_000
    # A retried step reports again: the first cost stays.
    assert finished(engine, prices, gid, a, "p-1", "canceled", None, {"predict_time": 9}) == 450_000
    assert tx(engine, lambda s: gens.get(s, gid).provider_cost_nusd) == 450_000
    tx(engine, lambda s: gens.fail(s, gid, code="prediction_canceled", message="x"))
    tx(engine, lambda s: gens.requeue(s, gid))
    assert tx(engine, lambda s: gens.get(s, gid).provider_cost_nusd) is None
    kept = tx(engine, lambda s: s.get_one(CreateAttempt, (gid, 1)))
    assert (kept.provider_cost_nusd, kept.prediction_id) == (450_000, "p-1")
    assert kept.provider_cost_at is not None


def test_attempts_whose_prediction_nobody_priced_are_found_once_ended(
    engine: sa.Engine, prices: PriceBook
) -> None:
    """What reconciliation prices: ended attempts with a prediction and no cost looked up."""
    tx(engine, lambda s: ledger.grant(s, "alice", 100, "fund"))
    since = datetime.now(UTC) - timedelta(hours=1)

    def unpriced() -> list[tuple[int, int, str, str]]:
        return tx(engine, lambda s: gens.attempts_without_cost(s, since=since, limit=10))

    gid = submit(engine, prices, "alice", UPSCALER)
    a = run_to_prediction(engine, prices, gid, "p-dead", UPSCALER)
    assert unpriced() == []  # still running: the await step will see it end
    tx(engine, lambda s: gens.fail(s, gid, code="run_failed", message="worker died"))
    assert unpriced() == [(gid, a, "p-dead", UPSCALER)]
    # The requeued attempt 2 is running; attempt 1 still waits for its price.
    tx(engine, lambda s: gens.requeue(s, gid))
    run_to_prediction(engine, prices, gid, "p-next", UPSCALER)
    assert unpriced() == [(gid, a, "p-dead", UPSCALER)]
    assert (
        finished(engine, prices, gid, a, "p-dead", "canceled", None, {"predict_time": 1}) == 225_000
    )
    assert unpriced() == []
    # Not mirrored: the generation is on attempt 2 now.
    assert tx(engine, lambda s: gens.get(s, gid).provider_cost_nusd) is None
    assert (
        tx(engine, lambda s: gens.attempts_without_cost(s, since=datetime.now(UTC), limit=10)) == []
    )


def test_an_unpriced_model_is_looked_at_once(engine: sa.Engine, prices: PriceBook) -> None:
    tx(engine, lambda s: ledger.grant(s, "alice", 100, "fund"))
    gid = submit(engine, prices, "alice", FREEBIE)
    a = run_to_prediction(engine, prices, gid, "p-free", FREEBIE)
    tx(engine, lambda s: gens.fail(s, gid, code="run_failed", message="worker died"))
    assert finished(engine, prices, gid, a, "p-free", "failed", None, {"predict_time": 3}) is None
    record = tx(engine, lambda s: s.get_one(CreateAttempt, (gid, a)))
    assert (record.provider_cost_nusd, record.provider_cost_at is not None) == (None, True)
    since = datetime.now(UTC) - timedelta(hours=1)
    assert tx(engine, lambda s: gens.attempts_without_cost(s, since=since, limit=10)) == []


def test_usage_sums_captures_and_provider_costs_per_user_model_and_day(
    engine: sa.Engine, prices: PriceBook
) -> None:
    build_usage(engine, prices)
    lines = tx(engine, lambda s: usage_lines(s))
    day = today()
    assert lines == [
        UsageLine(day, "alice", HAIKU, 2, 1, 1, 27, 165_000, 0),
        UsageLine(day, "alice", SKETCH, 1, 1, 0, 10, 6_000_000, 0),
        UsageLine(day, "bob", FREEBIE, 1, 1, 0, 1, 0, 1),
        UsageLine(day, "bob", UPSCALER, 1, 0, 1, 0, 990_000, 0),
    ]
    value = Decimal("0.01")
    haiku, sketch, _, upscale = lines
    assert sketch.margin_usd(value) == Decimal("0.094")
    assert upscale.margin_usd(value) == Decimal("-0.00099")
    assert haiku.margin_usd(value) == Decimal("0.269835")  # 27 credits - both attempts


def test_usage_credits_come_from_the_ledgers_captures(engine: sa.Engine, prices: PriceBook) -> None:
    """Regression guard: the report must read the capture entries, not the cached
    ``generations.amount_charged`` or ``holds.captured_amount`` (a hand-edited row would lie)."""
    ids = build_usage(engine, prices)
    gid = ids["haiku"]
    tx(
        engine,
        lambda s: s.execute(
            sa.text(f"UPDATE generations SET amount_charged = 59 WHERE id = {gid}")
        ),
    )
    tx(
        engine,
        lambda s: s.execute(
            sa.text(
                f"UPDATE holds SET captured_amount = 1 WHERE generation_id = {gid} "
                "AND status = 'captured'"
            )
        ),
    )
    line = next(x for x in tx(engine, lambda s: usage_lines(s)) if x.model == HAIKU)
    assert line.credits_charged == 27


def test_usage_filters_by_day_user_and_model(engine: sa.Engine, prices: PriceBook) -> None:
    ids = build_usage(engine, prices)
    # The sketch's attempt asked the provider two days ago.
    earlier = datetime.now(UTC) - timedelta(days=2)
    tx(
        engine,
        lambda s: s.execute(
            sa.update(CreateAttempt)
            .where(CreateAttempt.generation_id == ids["sketch"])
            .values(started_at=earlier)
        ),
    )
    day, before = today(), earlier.date()

    def keys(**kw: Any) -> list[tuple[date, str, str]]:
        return [(x.day, x.user_id, x.model) for x in tx(engine, lambda s: usage_lines(s, **kw))]

    assert keys(since=day) == [(day, "alice", HAIKU), (day, "bob", FREEBIE), (day, "bob", UPSCALER)]
    assert keys(until=before) == [(before, "alice", SKETCH)]
    assert keys(since=before, until=before) == [(before, "alice", SKETCH)]
    assert keys(since=before + timedelta(days=1), until=day - timedelta(days=1)) == []
    assert keys(users=["bob"]) == [(day, "bob", FREEBIE), (day, "bob", UPSCALER)]
    assert keys(models=[HAIKU, UPSCALER]) == [(day, "alice", HAIKU), (day, "bob", UPSCALER)]
    assert keys(users=["alice"], models=[UPSCALER]) == []


def test_the_cli_prints_the_table_and_exact_json(
    engine: sa.Engine,
    prices: PriceBook,
    db_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build_usage(engine, prices)
    monkeypatch.setenv("AI_HANDLER_CREDIT_VALUE_USD", "0.01")
    assert cli.main(["usage", "--url", db_url, "--json", "--user", "bob"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["credit_value_usd"] == "0.01"
    upscale = next(x for x in report["lines"] if x["model"] == UPSCALER)
    assert upscale == {
        "day": today().isoformat(),
        "user": "bob",
        "model": UPSCALER,
        "count": 1,
        "succeeded": 0,
        "refunded": 1,
        "credits_charged": 0,
        "credits_charged_usd": "0.00",
        "provider_cost_usd": "0.00099",
        "provider_cost_nusd": 990_000,
        "cost_unknown": 0,
        "margin_usd": "-0.00099",
    }
    assert report["total"]["count"] == 2
    assert report["total"]["cost_unknown"] == 1
    assert report["total"]["margin_usd"] == "0.00901"  # 1 credit (USD 0.01) - USD 0.00099

    assert cli.main(["usage", "--url", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("usage from the start to today (UTC days)")
    header = out[1].split()
    assert header == [
        "day",
        "user",
        "model",
        "count",
        "ok",
        "refunded",
        "credits",
        "credits_usd",
        "provider_usd",
        "margin_usd",
        "cost_unknown",
    ]
    body = [line.split() for line in out[3:-2]]
    assert [row[1:3] for row in body] == [
        ["alice", HAIKU],
        ["alice", SKETCH],
        ["bob", FREEBIE],
        ["bob", UPSCALER],
    ]
    assert body[3][3:] == ["1", "0", "1", "0", "0.000000", "0.000990", "-0.000990", "0"]
    assert out[-1].split() == [
        "total", "5", "3", "2", "38", "0.380000", "0.007155", "0.372845", "1",
    ]  # fmt: skip

    assert cli.main(["usage", "--url", db_url, "--since", "2026-13-01"]) == 2
    assert "is not a day" in capsys.readouterr().err
