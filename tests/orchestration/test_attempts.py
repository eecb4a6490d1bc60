"""Transitions and S3 keys belong to one attempt, on SQLite and PostgreSQL.

Regressions (traced): ``fail``, ``succeed`` and ``record_prediction`` were keyed by generation
only, and outputs went to ``generations/<id>/<index>``. So a run still alive for attempt 1 after
a requeue could fail attempt 2 (releasing its hold while its prediction ran on) or capture
attempt 2's hold with attempt 1's output; a regenerate overwrote the outputs the user had paid
for; and an attempt refunded after its upload kept its objects readable in S3.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, build_op_context, instance_for_test
from dagster_aws.s3 import S3Resource

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation, Hold
from ai_handler_dagster.devstack.emulator import EmulatorHandle
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration.generation import AwaitedPrediction, finalize, store_outputs
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from ai_handler_dagster.storage.objects import StagedFile
from ai_handler_dagster.storage.s3 import S3OutputStore, file_sha256
from tests.support.orchestration import grant, run_pending, submit

pytestmark = pytest.mark.usefixtures("aws_env")

SKETCH = "demo/pixel-sketch"
OUTPUT = {
    "key": "generations/1/a1/0.png",
    "uri": "s3://b/generations/1/a1/0.png",
    "size": 3,
    "sha256": "0" * 64,
    "content_type": "image/png",
}


def _row(app_db: str, gid: int) -> Generation:
    with session_scope(make_engine(app_db)) as session:
        row = gens.get(session, gid)
        session.expunge_all()
    return row


def test_a_run_of_an_earlier_attempt_cannot_touch_the_new_one(app_db: str) -> None:
    grant(app_db, "ada", 100)
    [gid] = submit(app_db, "ada", [(SKETCH, {"prompt": "twice"})])
    engine, prices = make_engine(app_db), load_pricing()
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-a1", prices=prices)
        gens.fail(session, gid, code="prediction_failed", message="attempt 1 failed", attempt=1)
        gens.requeue(session, gid)
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-a2", prices=prices)
        gens.record_prediction(session, gid, "pred-a2", SKETCH, "v", attempt=2)
    # The old run, still alive, tries to settle attempt 1.
    for late in (
        lambda s: gens.fail(s, gid, code="run_failed", message="old run", attempt=1),
        lambda s: gens.succeed(
            s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices, attempt=1
        ),
        lambda s: gens.record_prediction(s, gid, "pred-a1-late", SKETCH, "v", attempt=1),
    ):
        with pytest.raises(gens.AttemptMismatch), session_scope(engine) as session:
            late(session)
    row = _row(app_db, gid)
    assert (row.status, row.attempt, row.prediction_id) == ("running", 2, "pred-a2")
    with session_scope(engine) as session:
        hold = session.get(Hold, row.hold_id)
        assert hold is not None and hold.status == "pending"
        # The right attempt, with another prediction than its own, is refused too.
        with pytest.raises(gens.InvalidTransition, match="not pred-other"):
            gens.succeed(
                session,
                gid,
                outputs=[OUTPUT],
                predict_time=1.0,
                prices=prices,
                attempt=2,
                prediction_id="pred-other",
            )


def test_a_regenerate_keeps_what_the_user_paid_for(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    grant(app_db, "bo", 100)
    [gid] = submit(app_db, "bo", [(SKETCH, {"prompt": "again", "seed": 3})])
    run_pending(app_db, emulator, local_s3, bucket, instance)
    first = _row(app_db, gid).outputs
    assert [o["key"] for o in first or []] == [f"generations/{gid}/a1/0.png"]
    with session_scope(make_engine(app_db)) as session:
        gens.requeue(session, gid, include_succeeded=True)
    run_pending(app_db, emulator, local_s3, bucket, instance)
    row = _row(app_db, gid)
    assert row.status == "succeeded" and row.attempt == 2
    assert [o["key"] for o in row.outputs or []] == [f"generations/{gid}/a2/0.png"]
    store = S3OutputStore(local_s3.client(), bucket)
    assert store.list_keys(f"generations/{gid}/") == [
        f"generations/{gid}/a1/0.png",
        f"generations/{gid}/a2/0.png",
    ]
    with session_scope(make_engine(app_db)) as session:
        records = session.scalars(
            sa.select(CreateAttempt)
            .where(CreateAttempt.generation_id == gid)
            .order_by(CreateAttempt.attempt)
        ).all()
        assert [r.outputs for r in records] == [first, row.outputs]
        assert ledger.balance(session, "bo").balance == 100 - 2 * 5


def test_an_attempt_refunded_after_its_upload_leaves_nothing_readable(
    app_db: str, local_s3: LocalS3, bucket: str, tmp_path: Path
) -> None:
    grant(app_db, "cy", 100)
    [gid] = submit(app_db, "cy", [(SKETCH, {"prompt": "refunded elsewhere"})])
    engine, prices = make_engine(app_db), load_pricing()
    with session_scope(engine) as session:
        gens.start_attempt(session, gid, run_id="run-1", prices=prices)
        gens.record_prediction(session, gid, "pred-1", SKETCH, "v", attempt=1)
    staged_path = tmp_path / "0.png"
    staged_path.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    digest, size = file_sha256(staged_path)
    staged = StagedFile(staged_path, "image/png", "png", size, digest)
    store = S3OutputStore(local_s3.client(), bucket, "refund-test")
    objects = store.store_generation(gid, 1, [staged])
    # Another path (the hold expired, reconciliation) refunds it before finalize runs.
    with session_scope(engine) as session:
        gens.fail(session, gid, code="deadline_exceeded", message="credit hold expired")
    io_manager = GenerationOutputsIOManager(
        s3=S3Resource(endpoint_url=local_s3.endpoint_url, region_name="us-east-1"),
        bucket=bucket,
        prefix="refund-test",
    )
    awaited = [AwaitedPrediction(gid, 1, "pred-1", output=None, predict_time=1.0)]
    done = finalize(
        build_op_context(),
        {gid: objects},
        awaited,
        database=DatabaseResource(url=app_db),
        pricing=PricingResource(),
        outputs_io_manager=io_manager,
    )
    assert done == []
    assert store.list_keys(f"refund-test/generations/{gid}/") == []
    assert _row(app_db, gid).amount_charged == 0


def test_a_hold_lives_as_long_as_the_formula_says(
    app_db: str, emulator: EmulatorHandle, local_s3: LocalS3, bucket: str
) -> None:
    """Regression (traced): holds lived a fixed 2 h, whatever the run's maximum and the queue:
    a long run's hold could expire under it. A hold lives the queue allowance, a run's maximum
    runtime and the refund margin (lifetimes.py): the running instance's maximum for a row an
    application inserted (held when its run starts), the shipped dagster.yaml's for a request
    held at submit."""
    grant(app_db, "di", 100)
    [submitted] = submit(app_db, "di", [(SKETCH, {"prompt": "held at submit"})])
    with make_engine(app_db).begin() as conn:
        inserted = conn.execute(
            sa.insert(Generation)
            .values(user_id="di", model=SKETCH, input={"prompt": "held by its run"})
            .returning(Generation.id)
        ).scalar_one()
    overrides = {"run_monitoring": {"enabled": True, "max_runtime_seconds": 2000}}
    with instance_for_test(overrides=overrides) as instance:
        run_pending(app_db, emulator, local_s3, bucket, instance)

    def lifetime(gid: int) -> timedelta:
        with session_scope(make_engine(app_db)) as session:
            hold = session.get(Hold, gens.get(session, gid).hold_id)
            assert hold is not None
            return hold.expires_at - hold.created_at

    assert lifetime(inserted) == timedelta(seconds=900 + 2000 + 600)
    assert lifetime(submitted) == timedelta(seconds=900 + 3600 + 600)


class _BrokenStaging(OutputPolicyResource):
    """Stages one file, then fails with an error that is no GenerationError (a bug, a full
    disk), as a download thread could."""

    def stage(self, output: Any, policy: Any, tmp_dir: str) -> list[Any]:
        (Path(tmp_dir) / "half-written.png").write_bytes(b"\x89PNG")
        raise OSError("No space left on device")


def test_a_failing_download_thread_leaves_no_staged_files(
    app_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (traced): store_outputs left its staging folder behind when a thread raised
    something other than a GenerationError; the step fails (its retry stages again) clean."""
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    awaited = [AwaitedPrediction(1, 1, "pred-1", output=["x"], predict_time=1.0)]
    with pytest.raises(OSError, match="No space left"):
        store_outputs(
            build_op_context(),
            awaited,
            database=DatabaseResource(url=app_db),
            output_policy=_BrokenStaging(),
        )
    assert list(temp_root.iterdir()) == []
