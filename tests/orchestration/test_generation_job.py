"""The generation job in process, against the emulator and S3 over real HTTP, on SQLite and
PostgreSQL.

Proves that one run carries a batch in which each generation succeeds or fails on its own: the
model failure is refunded and its neighbours are charged and stored under their exact keys; an
unaffordable generation is refused without a charge; re-running the finished batch changes nothing;
an op that fails for good refunds the unfinished generations through the failure hook; and
per-output and per-token prices capture exactly what the emulator reported (outputs stored, token
counts).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.devstack.emulator import EmulatorHandle
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration.generation import batch_run_config, generation_job
from ai_handler_dagster.orchestration.request_sensor import batch_key_for
from ai_handler_dagster.resources.database import PricingResource
from tests.support.orchestration import grant, job_resources, submit

pytestmark = pytest.mark.usefixtures("aws_env")


def claim(db_url: str, limit: int = 100) -> list[int]:
    with session_scope(make_engine(db_url)) as session:
        rows = gens.claim_pending(session, limit=limit, batch_key_fn=batch_key_for)
        return [r.id for r in rows]


def rows_by_id(db_url: str) -> dict[int, Generation]:
    with session_scope(make_engine(db_url)) as session:
        rows = list(session.scalars(sa.select(Generation)))
        session.expunge_all()
    return {r.id: r for r in rows}


def test_a_batch_settles_each_generation_on_its_own(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    grant(app_db, "ada", 100)
    ids = submit(
        app_db,
        "ada",
        [
            ("demo/pixel-sketch", {"prompt": "a lighthouse", "seed": 4}),
            ("demo/pixel-sketch", {"prompt": "this one breaks [fail]"}),
            ("demo/haiku-text", {"prompt": "rain"}),
            ("demo/pixel-sketch", {"prompt": "two moons", "num_outputs": 2}),
        ],
    )
    assert claim(app_db) == ids
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(app_db, emulator, local_s3, bucket),
        instance=instance,
    )
    assert result.success
    rows = rows_by_id(app_db)
    assert [rows[i].status for i in ids] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert rows[ids[1]].error_code == "prediction_failed"
    assert rows[ids[1]].amount_charged == 0
    # Exact keys; the bytes in S3 match the recorded checksums.
    s3 = local_s3.client()
    assert [o["key"] for o in rows[ids[0]].outputs or []] == [f"generations/{ids[0]}/a1/0.png"]
    assert [o["key"] for o in rows[ids[2]].outputs or []] == [f"generations/{ids[2]}/a1/0.txt"]
    assert [o["key"] for o in rows[ids[3]].outputs or []] == [
        f"generations/{ids[3]}/a1/0.png",
        f"generations/{ids[3]}/a1/1.png",
    ]
    for gid in (ids[0], ids[2], ids[3]):
        for obj in rows[gid].outputs or []:
            body = s3.get_object(Bucket=bucket, Key=obj["key"])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == obj["sha256"]
            assert len(body) == obj["size"]
    charged = sum(rows[i].amount_charged for i in ids)
    # 5 per image stored; the haiku: 1 input token and 10 output tokens, ceil(0.02 + 6.25) of
    # the 60 held.
    assert [rows[i].amount_charged for i in ids] == [5, 0, 7, 10]
    assert charged == 22
    with session_scope(make_engine(app_db)) as session:
        assert ledger.verify(session) == []
        bal = ledger.balance(session, "ada")
    assert (bal.balance, bal.held) == (100 - charged, 0)
    # Exactly the three successful predictions were paid for, once each.
    paid = [p for p in emulator.predictions() if p["status"] == "succeeded"]
    assert len(paid) == 3

    # Running the same batch again changes nothing: no new prediction, no new charge.
    again = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(app_db, emulator, local_s3, bucket),
        instance=instance,
    )
    assert again.success
    assert len(emulator.predictions()) == 4
    with session_scope(make_engine(app_db)) as session:
        assert ledger.balance(session, "ada").balance == 100 - charged
        assert ledger.verify(session) == []


def test_a_user_who_cannot_afford_the_hold_is_refused_without_a_charge(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    grant(app_db, "bo", 5)
    [first] = submit(app_db, "bo", [("demo/pixel-sketch", {"prompt": "first"})])
    # submit would refuse a second request now (the first holds the 5 credits); an application
    # that writes its rows straight into the table finds out when the run starts.
    with make_engine(app_db).begin() as conn:
        second = conn.execute(
            sa.insert(Generation)
            .values(user_id="bo", model="demo/pixel-sketch", input={"prompt": "second"})
            .returning(Generation.id)
        ).scalar_one()
    ids = [first, second]
    claim(app_db)
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(app_db, emulator, local_s3, bucket),
        instance=instance,
    )
    assert result.success
    rows = rows_by_id(app_db)
    assert [rows[i].status for i in ids] == ["succeeded", "failed"]
    assert rows[ids[1]].error_code == "insufficient_credits"
    assert len(emulator.predictions()) == 1
    with session_scope(make_engine(app_db)) as session:
        assert ledger.balance(session, "bo").balance == 0
        assert ledger.verify(session) == []


def test_an_op_that_fails_for_good_refunds_the_batch_through_the_hook(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    """Regression: an infrastructure failure after the holds (S3 gone) must not leave credits
    held; the failure hook releases them and marks the generations failed."""
    grant(app_db, "cy", 50)
    ids = submit(app_db, "cy", [("demo/pixel-sketch", {"prompt": "kept"})])
    claim(app_db)
    resources = job_resources(app_db, emulator, local_s3, bucket)
    from dagster_aws.s3 import S3Resource

    from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager

    broken = S3Resource(endpoint_url="http://127.0.0.1:9", region_name="us-east-1")
    resources["outputs_io_manager"] = GenerationOutputsIOManager(s3=broken, bucket="nowhere")
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    row = rows_by_id(app_db)[ids[0]]
    assert row.status == "failed"
    assert row.error_code == "run_failed"
    with session_scope(make_engine(app_db)) as session:
        bal = ledger.balance(session, "cy")
        assert (bal.balance, bal.held) == (50, 0)
        assert ledger.verify(session) == []


COUNTED_PRICES = """
[models."demo/pixel-sketch"]
credits_per_output = 5
outputs_field = "num_outputs"
outputs_default = 1
outputs_max = 4

[models."demo/haiku-text"]
credits_per_input_token = 0.25
credits_per_output_token = 0.5
max_tokens_field = "max_tokens"
max_tokens_default = 64
max_tokens_max = 512
max_input_tokens = 100
"""


def test_per_output_and_per_token_prices_charge_what_the_emulator_reported(
    app_db: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression guard: the token counts in a prediction's metrics must reach the capture
    (through the pickled AwaitedPrediction), and a per-output price must count the objects
    stored; had they not, each generation would be charged its whole hold."""
    table = tmp_path / "prices.toml"
    table.write_text(COUNTED_PRICES)
    monkeypatch.setenv("AI_HANDLER_PRICING_FILE", str(table))
    grant(app_db, "di", 500)
    ids = submit(
        app_db,
        "di",
        [
            ("demo/pixel-sketch", {"prompt": "three moons", "num_outputs": 3, "seed": 2}),
            ("demo/pixel-sketch", {"prompt": "one moon", "seed": 2}),
            ("demo/haiku-text", {"prompt": "autumn rain on a tin roof"}),
            ("demo/haiku-text", {"prompt": "the sea at night", "max_tokens": 4}),
        ],
    )
    rows = rows_by_id(app_db)
    # Holds: 5 per output asked; ceil(0.25 * 100 + 0.5 * max_tokens).
    assert [rows[i].amount_held for i in ids] == [15, 5, 57, 27]
    claim(app_db)
    resources = job_resources(app_db, emulator, local_s3, bucket)
    resources["pricing"] = PricingResource(pricing_file=str(table))
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids), resources=resources, instance=instance
    )
    assert result.success
    rows = rows_by_id(app_db)
    assert [rows[i].status for i in ids] == ["succeeded"] * 4
    assert [len(rows[i].outputs or []) for i in ids] == [3, 1, 1, 1]
    reported = {p["input"]["prompt"]: p["metrics"] for p in emulator.predictions()}
    rain, sea = reported["autumn rain on a tin roof"], reported["the sea at night"]
    # What the emulator's haiku model reports: prompt words in, chunks out (at most max_tokens).
    assert (rain["input_token_count"], rain["output_token_count"]) == (6, 10)
    assert (sea["input_token_count"], sea["output_token_count"]) == (4, 4)
    # ceil(0.25 * 6 + 0.5 * 10) = 7 and 0.25 * 4 + 0.5 * 4 = 3 exactly.
    assert [rows[i].amount_charged for i in ids] == [15, 5, 7, 3]
    with session_scope(make_engine(app_db)) as session:
        assert ledger.verify(session) == []
        bal = ledger.balance(session, "di")
    assert (bal.balance, bal.held) == (500 - 30, 0)
