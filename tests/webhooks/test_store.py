"""One delivery is one transaction that deduplicates and never moves a prediction backwards.

Proves, on SQLite and PostgreSQL through ``handle``: an accepted delivery records its
``webhook-id`` and the prediction as received; a replayed ``webhook-id`` changes nothing even
with another (validly signed) body; wrong signatures, old or future timestamps, oversized
bodies, malformed or non-prediction JSON are refused with their status and change nothing;
events arriving out of order never move a terminal state back (nor ``processing`` back to
``starting``) and the first terminal state stays; concurrent deliveries racing on one
prediction end terminal every time; a database failure answers 500 so the sender retries;
``prune`` deletes only old rows.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster.db.models import PredictionState, WebhookDelivery, utcnow
from ai_handler_dagster.webhooks import MAX_BODY_BYTES, handle, prune, record_delivery
from tests.support.webhooks import SECRET, prediction, signed, state_of, table_rows


def _deliver(engine: sa.Engine, doc: dict[str, Any], msg_id: str) -> tuple[int, str]:
    headers, body = signed(doc, msg_id=msg_id)
    return handle(engine, headers, body, SECRET)


def test_accepted_delivery_records_id_and_prediction(engine: sa.Engine) -> None:
    doc = prediction("p1", "succeeded")
    assert _deliver(engine, doc, "msg_a") == (204, "accepted")
    deliveries, states = table_rows(engine)
    assert deliveries == [("msg_a", "p1")]
    assert states == [("p1", "succeeded", doc)]


def test_replayed_webhook_id_changes_nothing(engine: sa.Engine) -> None:
    assert _deliver(engine, prediction("p1", "processing"), "msg_a") == (204, "accepted")
    before = table_rows(engine)
    # Same id, a different body signed afresh (as a retry or a replay would be): ignored.
    assert _deliver(engine, prediction("p1", "succeeded"), "msg_a") == (204, "duplicate")
    assert table_rows(engine) == before
    assert state_of(engine, "p1") == ("processing", prediction("p1", "processing"))


def _oversized() -> bytes:
    doc = prediction("p2", logs="x" * MAX_BODY_BYTES)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        pytest.param(
            lambda: (
                {**signed(prediction("p2"))[0], "webhook-signature": "v1,AAAA"},
                signed(prediction("p2"))[1],
            ),
            401,
            "No matching signature",
            id="wrong-signature",
        ),
        pytest.param(
            lambda: signed(prediction("p2"), timestamp=int(time.time()) - 301),
            401,
            "too old",
            id="old-timestamp",
        ),
        pytest.param(
            lambda: signed(prediction("p2"), timestamp=int(time.time()) + 301),
            401,
            "too new",
            id="future-timestamp",
        ),
        pytest.param(lambda: signed(_oversized()), 413, "over 1048576 bytes", id="oversized"),
        pytest.param(lambda: signed(b'{"id": "p2", "status": '), 400, "not JSON", id="malformed"),
        pytest.param(lambda: signed(b"\xff\xfe"), 400, "not UTF-8", id="not-utf8"),
        pytest.param(lambda: signed(b"[1, 2]"), 400, "not a JSON object", id="array"),
        pytest.param(lambda: signed({"status": "succeeded"}), 400, "prediction id", id="no-id"),
        pytest.param(
            lambda: signed({"id": "../x", "status": "succeeded"}),
            400,
            "prediction id",
            id="bad-id",
        ),
        pytest.param(lambda: signed({"id": "p2"}), 400, "status", id="no-status"),
        pytest.param(
            lambda: signed(b'{"id": "p2", "status": "succeeded", "metrics": {"t": NaN}}'),
            400,
            "not JSON",
            id="nan",
        ),
        pytest.param(
            lambda: signed(prediction("p2"), msg_id="m" * 256), 400, "too long", id="long-id"
        ),
    ],
)
def test_refused_deliveries_change_nothing(
    engine: sa.Engine, make: Any, status: int, reason: str
) -> None:
    assert _deliver(engine, prediction("p1", "processing"), "msg_a") == (204, "accepted")
    before = table_rows(engine)
    headers, body = make()
    code, message = handle(engine, headers, body, SECRET)
    assert (code, reason in message) == (status, True), message
    assert table_rows(engine) == before


def test_out_of_order_events_keep_the_terminal_state(engine: sa.Engine) -> None:
    assert _deliver(engine, prediction("p1", "processing"), "msg_1") == (204, "accepted")
    final = prediction("p1", "succeeded")
    assert _deliver(engine, final, "msg_3") == (204, "accepted")
    # Late (retried) earlier events: remembered as delivered, the state stays terminal.
    assert _deliver(engine, prediction("p1", "starting"), "msg_0") == (204, "out_of_order")
    assert _deliver(engine, prediction("p1", "processing"), "msg_2") == (204, "out_of_order")
    # A prediction ends once: a later, different terminal report does not replace the first.
    assert _deliver(engine, prediction("p1", "canceled"), "msg_4") == (204, "out_of_order")
    assert state_of(engine, "p1") == ("succeeded", final)
    deliveries, _ = table_rows(engine)
    assert [d[0] for d in deliveries] == ["msg_0", "msg_1", "msg_2", "msg_3", "msg_4"]


def test_running_states_only_move_forward(engine: sa.Engine) -> None:
    assert _deliver(engine, prediction("p1", "processing", logs="1/3"), "m1") == (204, "accepted")
    assert _deliver(engine, prediction("p1", "starting"), "m0") == (204, "out_of_order")
    # Another processing event (logs, output) replaces the previous one.
    later = prediction("p1", "processing", logs="1/3\n2/3")
    assert _deliver(engine, later, "m2") == (204, "accepted")
    assert state_of(engine, "p1") == ("processing", later)
    # A status newer than this code ranks lowest but is still recorded for a new prediction.
    assert _deliver(engine, prediction("p9", "queued_elsewhere"), "m9") == (204, "accepted")
    assert state_of(engine, "p9") is not None


def test_concurrent_events_on_one_prediction_end_terminal(engine: sa.Engine) -> None:
    # Per prediction: one terminal event raced by seven running ones, released together.
    rounds = 4
    errors: list[BaseException] = []

    def send(doc: dict[str, Any], msg_id: str, barrier: threading.Barrier) -> None:
        try:
            barrier.wait()
            record_delivery(engine, msg_id, doc)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    for r in range(rounds):
        pid = f"race{r}"
        barrier = threading.Barrier(8, timeout=30)
        docs = [prediction(pid, "succeeded")] + [
            prediction(pid, "processing", logs=str(i)) for i in range(7)
        ]
        threads = [
            threading.Thread(target=send, args=(doc, f"{pid}-{i}", barrier))
            for i, doc in enumerate(docs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert state_of(engine, pid) == ("succeeded", prediction(pid, "succeeded"))


def test_database_failure_answers_500_and_records_nothing(tmp_path: Any) -> None:
    # A database without the tables (never migrated) stands for one that fails the write.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        headers, body = signed(prediction("p1"))
        assert handle(engine, headers, body, SECRET) == (500, "database error")
    finally:
        engine.dispose()


def test_prune_deletes_only_old_rows(engine: sa.Engine) -> None:
    old = utcnow() - timedelta(days=10)
    record_delivery(engine, "old", prediction("p_old"), now=old)
    record_delivery(engine, "new", prediction("p_new"))
    assert prune(engine, timedelta(days=3)) == (1, 1)
    with engine.connect() as conn:
        assert conn.scalars(sa.select(WebhookDelivery.webhook_id)).all() == ["new"]
        assert conn.scalars(sa.select(PredictionState.prediction_id)).all() == ["p_new"]


def test_reconciliation_prunes_what_webhooks_reported(engine: sa.Engine) -> None:
    """Regression: deliveries and states were pruned only by hand (``webhooks prune``), so the
    tables grew with every prediction ever made; reconciliation, on its schedule, prunes them."""
    from dagster import build_op_context, instance_for_test

    from ai_handler_dagster.orchestration.recovery import reconcile
    from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
    from ai_handler_dagster.resources.replicate import ReplicateResource
    from ai_handler_dagster.webhooks.store import RETENTION

    record_delivery(engine, "old", prediction("p_old"), now=utcnow() - RETENTION - timedelta(1))
    record_delivery(engine, "new", prediction("p_new"))
    unreachable = ReplicateResource(
        api_token="r8_unused", base_url="http://127.0.0.1:9", request_attempts=1
    )
    with instance_for_test() as instance:
        result = reconcile(
            build_op_context(instance=instance),
            database=DatabaseResource(url=engine.url.render_as_string(hide_password=False)),
            replicate=unreachable,
            pricing=PricingResource(),
        )
    assert result["pruned_webhook_records"] == 2
    with engine.connect() as conn:
        assert conn.scalars(sa.select(WebhookDelivery.webhook_id)).all() == ["new"]
        assert conn.scalars(sa.select(PredictionState.prediction_id)).all() == ["p_new"]
