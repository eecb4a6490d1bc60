"""The generation job records what the provider charged for each prediction and shows the
margin in the finalize step's metadata, against the emulator and S3 over real HTTP, on SQLite
and PostgreSQL.

Proves: a succeeded per-output prediction costs the outputs it returned, a per-token one the
tokens the emulator reported; a failed prediction on a per-second price is refunded yet costs the
seconds it ran (Replicate bills failed predictions); the cost sits on the attempt's
``create_attempts`` row and on the generation; the finalize step's metadata carries the credits
charged, the provider's cost, the margin at the configured credit value and a per-generation
table; ``usage_lines`` reads the same figures back; and reconciliation prices, once, the
predictions of a run that died and was refunded before it saw them end.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from ai_handler_dagster import adoption
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation
from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration import recovery
from ai_handler_dagster.orchestration.generation import batch_run_config, generation_job
from ai_handler_dagster.orchestration.request_sensor import batch_key_for
from ai_handler_dagster.pricing import parse_pricing
from ai_handler_dagster.resources.database import PricingResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.usage import usage_lines
from tests.support.orchestration import grant, job_resources, submit

pytestmark = pytest.mark.usefixtures("aws_env")

SHIPPED = (resources.files("ai_handler_dagster") / "pricing.toml").read_text(encoding="utf-8")

#: The shipped table with the image model priced as a custom model on a T4 (per second).
PER_SECOND = SHIPPED.replace(
    '[models."demo/pixel-sketch".provider]\nusd_per_output = 0.003\n',
    '[models."demo/pixel-sketch".provider]\nhardware = "nvidia-t4"\n',
)


def _costs(db_url: str) -> dict[int, tuple[int | None, int | None]]:
    """generation id -> (cost on its attempt row, cost mirrored on the generation)."""
    with session_scope(make_engine(db_url)) as session:
        rows = session.execute(
            sa.select(
                Generation.id, CreateAttempt.provider_cost_nusd, Generation.provider_cost_nusd
            ).join(CreateAttempt, CreateAttempt.generation_id == Generation.id)
        ).all()
    return {gid: (attempt_cost, mirrored) for gid, attempt_cost, mirrored in rows}


def _finalize_metadata(result: Any) -> dict[str, Any]:
    [output] = [e for e in result.events_for_node("finalize") if e.is_successful_output]
    return {key: value.value for key, value in output.step_output_data.metadata.items()}


def _run(
    db_url: str,
    emulator: EmulatorHandle,
    s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    table: Path,
    ids: list[int],
) -> Any:
    """Claim the pending rows as the sensor would and run them as one batch, priced by ``table``."""
    with session_scope(make_engine(db_url)) as session:
        gens.claim_pending(session, limit=100, batch_key_fn=batch_key_for)
    run_resources = job_resources(db_url, emulator, s3, bucket)
    run_resources["pricing"] = PricingResource(pricing_file=str(table))
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids), resources=run_resources, instance=instance
    )
    assert result.success
    return result


def test_each_prediction_records_its_provider_cost_and_finalize_shows_the_margin(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = tmp_path / "prices.toml"
    table.write_text(SHIPPED)
    monkeypatch.setenv("AI_HANDLER_CREDIT_VALUE_USD", "0.02")
    grant(app_db, "ada", 100)
    ids = submit(
        app_db,
        "ada",
        [
            ("demo/pixel-sketch", {"prompt": "two moons", "num_outputs": 2}),
            ("demo/pixel-sketch", {"prompt": "this one breaks [fail]"}),
            ("demo/haiku-text", {"prompt": "rain"}),
        ],
    )
    result = _run(app_db, emulator, local_s3, bucket, instance, table, ids)
    costs = _costs(app_db)
    # Two images at USD 0.003; a failed image model returns none; the haiku reported 1 input
    # token and 10 output tokens: 0.05/M + 10 x 0.25/M = USD 0.00000255.
    assert [costs[i] for i in ids] == [(6_000_000, 6_000_000), (0, 0), (2_550, 2_550)]
    meta = _finalize_metadata(result)
    # Charged: 10 credits for the images, ceil(0.02 + 6.25) = 7 for the haiku.
    assert meta["credits_charged"] == 17
    assert meta["credit_value_usd"] == "0.02"
    assert meta["provider_cost_usd"] == pytest.approx(0.00600255)
    assert meta["margin_usd"] == pytest.approx(17 * 0.02 - 0.00600255)
    assert meta["provider_cost_unknown"] == 0
    table_md = meta["generations"]
    assert "| provider_usd | margin_usd |" in table_md
    assert f"| {ids[0]} | succeeded | 10 |" in table_md
    assert "| 0.006000 | 0.194000 |" in table_md  # 10 x 0.02 - 0.006


def test_a_failed_prediction_on_a_per_second_price_costs_the_seconds_it_ran(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    tmp_path: Path,
) -> None:
    """The image model priced as a custom model on a T4: billed per second, failed or not."""
    per_second = PER_SECOND
    assert per_second != SHIPPED
    table = tmp_path / "prices.toml"
    table.write_text(per_second)
    grant(app_db, "bo", 100)
    ids = submit(
        app_db,
        "bo",
        [
            ("demo/pixel-sketch", {"prompt": "a lighthouse"}),
            ("demo/pixel-sketch", {"prompt": "this one breaks [fail]"}),
        ],
    )
    _run(app_db, emulator, local_s3, bucket, instance, table, ids)
    seconds = {p["input"]["prompt"]: p["metrics"]["predict_time"] for p in emulator.predictions()}
    expected = [
        math.ceil(Decimal("0.000225") * Decimal(repr(float(seconds[prompt]))) * 10**9)
        for prompt in ("a lighthouse", "this one breaks [fail]")
    ]
    assert all(cost > 0 for cost in expected)
    costs = _costs(app_db)
    assert [costs[i] for i in ids] == [(c, c) for c in expected]
    with session_scope(make_engine(app_db)) as session:
        [line] = usage_lines(session)
        failed = session.get_one(Generation, ids[1])
        assert (failed.status, failed.amount_charged) == ("failed", 0)
    assert (line.count, line.succeeded, line.refunded) == (2, 1, 1)
    assert line.credits_charged == 5
    assert line.provider_cost_nusd == sum(expected)


def test_reconciliation_prices_predictions_a_dead_run_never_saw_end(
    app_db: str, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    """Regression guard: a run whose worker died is refunded by a recovery path, which cancels
    its prediction without waiting for its end; Replicate bills the seconds it ran all the
    same, so without the reconciliation sweep that cost would never be recorded."""
    per_second = PER_SECOND
    prices = parse_pricing(per_second, source="test table")
    engine = make_engine(app_db)
    client = ReplicateResource(api_token=emulator.token, base_url=emulator.base_url).get_client()
    grant(app_db, "cy", 100)
    ids = submit(
        app_db,
        "cy",
        [("demo/pixel-sketch", {"prompt": "slow"}), ("demo/haiku-text", {"prompt": "rain"})],
    )
    for gid in ids:
        with session_scope(engine) as session:
            row = gens.start_attempt(session, gid, run_id="dead-run", prices=prices)
            attempt = adoption.Attempt(gid, row.attempt, row.model, dict(row.input))
        adoption.obtain(engine, client, attempt, webhook=None, log=lambda _: None)
    time.sleep(0.3)  # the emulator's models take 0.2 s: let them run a little
    refunded = recovery.refund_unfinished(
        engine, run_id="dead-run", code="run_failed", message="worker died",
        cancel_prediction=client.cancel,
    )  # fmt: skip
    assert refunded == ids
    assert [costs for costs in _costs(app_db).values()] == [(None, None)] * 2
    since = datetime.now(UTC) - timedelta(hours=1)
    deadline = time.monotonic() + 10
    priced = 0
    while priced < 2 and time.monotonic() < deadline:  # a cancel may take a moment to land
        priced += recovery.price_unseen_predictions(engine, client, prices, since=since)
    assert priced == 2
    reported = {p["input"]["prompt"]: p for p in emulator.predictions()}
    seconds = reported["slow"]["metrics"]["predict_time"]
    costs = _costs(app_db)
    expected = math.ceil(Decimal("0.000225") * Decimal(repr(float(seconds))) * 10**9)
    assert costs[ids[0]] == (expected, expected)
    rain = reported["rain"]["metrics"]
    tokens = Decimal("0.05") * rain.get("input_token_count", 0)
    tokens += Decimal("0.25") * rain.get("output_token_count", 0)
    expected_tokens = (
        math.ceil(tokens * 1000) if "input_token_count" in rain or "output_token_count" in rain
        else None
    )  # fmt: skip
    assert costs[ids[1]] == (expected_tokens, expected_tokens)
    # Priced once: the next sweep finds nothing and asks the provider nothing.
    assert recovery.price_unseen_predictions(engine, client, prices, since=since) == 0


def test_a_prediction_the_provider_no_longer_knows_stays_unknown_and_is_not_asked_again(
    app_db: str, emulator: EmulatorHandle
) -> None:
    """Regression guard: the sweep goes oldest first, so an attempt whose prediction answers
    404 must not stop it (nor be asked about every five minutes for a day)."""
    engine = make_engine(app_db)
    client = ReplicateResource(api_token=emulator.token, base_url=emulator.base_url).get_client()
    prices = parse_pricing(SHIPPED, source="shipped")
    grant(app_db, "di", 100)
    [gid] = submit(app_db, "di", [("demo/pixel-sketch", {"prompt": "gone"})])
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="dead-run", prices=prices)
        gens.record_prediction(session, gid, "p-unknown-to-the-provider", "demo/pixel-sketch", "v")
        gens.fail(session, gid, code="run_failed", message="worker died")
    since = datetime.now(UTC) - timedelta(hours=1)
    assert recovery.price_unseen_predictions(engine, client, prices, since=since) == 0
    with session_scope(engine) as session:
        record = session.get_one(CreateAttempt, (gid, 1))
        assert (record.provider_cost_nusd, record.provider_cost_at is not None) == (None, True)
        assert gens.attempts_without_cost(session, since=since, limit=10) == []


def test_a_prediction_canceled_at_its_deadline_is_priced_once_its_cancel_lands(
    app_db: str,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the await step priced a prediction from the answer to its own cancel at the
    deadline. That answer may still show it running, without the final ``predict_time``; the
    cost was stored as unknown and marked priced, so nobody ever recorded the seconds the
    provider billed for it. It is now left to reconciliation, which prices it once it ends."""
    per_second = PER_SECOND
    table = tmp_path / "prices.toml"
    table.write_text(per_second)
    monkeypatch.setenv("AI_HANDLER_PREDICTION_DEADLINE_S", "10")
    lagging = start_emulator(EmulatorConfig(latency_s=0.2, cancel_lag_s=1.0), port=0)
    try:
        grant(app_db, "ez", 100)
        ids = submit(app_db, "ez", [("demo/pixel-sketch", {"prompt": "never ends [stuck]"})])
        _run(app_db, lagging, local_s3, bucket, instance, table, ids)
        engine = make_engine(app_db)
        with session_scope(engine) as session:
            row = session.get_one(Generation, ids[0])
            record = session.get_one(CreateAttempt, (ids[0], 1))
            assert (row.status, row.error_code, row.amount_charged) == (
                "failed",
                "deadline_exceeded",
                0,
            )
            assert (record.provider_cost_nusd, record.provider_cost_at) == (None, None)
        client = ReplicateResource(api_token=lagging.token, base_url=lagging.base_url).get_client()
        prices = parse_pricing(per_second, source="test table")
        since = datetime.now(UTC) - timedelta(hours=1)
        deadline = time.monotonic() + 10
        priced = 0
        while priced < 1 and time.monotonic() < deadline:  # the cancel lands after 1 s
            priced += recovery.price_unseen_predictions(engine, client, prices, since=since)
            time.sleep(0.2)
        assert priced == 1
        [reported] = lagging.predictions()
        assert reported["status"] == "canceled"
        seconds = reported["metrics"]["predict_time"]
        assert seconds >= 9
        expected = math.ceil(Decimal("0.000225") * Decimal(repr(float(seconds))) * 10**9)
        assert _costs(app_db)[ids[0]] == (expected, expected)
    finally:
        lagging.stop()
