"""Canceling a generation: one ending per hold, whatever it races with, and a run that copes.

Proves, on real SQLite and PostgreSQL: ``generations.cancel`` ends a pending, queued or running
generation ``canceled`` (``canceled_by_request``) with its hold released in one transaction and
one event; a repeated cancel changes nothing; a succeeded or failed generation, or a running one
whose prediction already succeeded at the provider (the webhook record, or the caller's look),
is refused with its status and nothing written; a create in flight when the cancel lands is
abandoned for good (no further try is sent, its late answer cannot be recorded). Many threads
racing a cancel against ``succeed``, ``fail`` and the refund paths' ``refund_unfinished`` end
each hold exactly once, and both verifiers stay clean.

Against the Replicate emulator: ``cancel.cancel_generation`` cancels a running prediction at the
provider, and refuses once the provider succeeded. Through the generation job (SQLite): a
generation canceled before its run, between reserve and create, while its create is in flight,
while its prediction runs, after the prediction succeeded, and just before finalize, is never
started, created, stored, charged or refunded twice, while its neighbour in the batch succeeds;
the refund paths then find nothing to settle. And ``ai-handler cancel`` does the same from the
command line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, instance_for_test
from sqlalchemy.orm import Session

from ai_handler_dagster import adoption, cancel, cli, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import (
    CreateAttempt,
    Generation,
    GenerationEvent,
    Hold,
    LedgerEntry,
    PredictionState,
)
from ai_handler_dagster.devstack.emulator import (
    STUCK_TRIGGER,
    EmulatorConfig,
    EmulatorHandle,
    start_emulator,
)
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.domain import ENDING_KINDS
from ai_handler_dagster.orchestration import generation as generation_ops
from ai_handler_dagster.orchestration.generation import batch_run_config, generation_job
from ai_handler_dagster.orchestration.recovery import refund_unfinished
from ai_handler_dagster.orchestration.request_sensor import batch_key_for
from ai_handler_dagster.pricing import PriceBook, load_pricing
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings
from tests.support.db import emptied, migrated_database, race
from tests.support.orchestration import job_resources

T = TypeVar("T")
SKETCH = "demo/pixel-sketch"  # 5 credits per output, one by default (hold 5)
OUTPUT = {
    "key": "outputs/1/a1/0.png",
    "uri": "s3://bucket/outputs/1/a1/0.png",
    "size": 1234,
    "sha256": "ab" * 32,
    "content_type": "image/png",
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with migrated_database(request) as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> sa.Engine:
    return emptied(db_url)


@pytest.fixture(scope="module")
def prices() -> PriceBook:
    return load_pricing()


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    handle = start_emulator(EmulatorConfig(latency_s=0.2, concurrency=8), port=0)
    try:
        yield handle
    finally:
        handle.stop()


def client_of(emulator: EmulatorHandle) -> ReplicateClient:
    return ReplicateClient(ReplicateSettings(api_token=emulator.token, base_url=emulator.base_url))


def tx(engine: sa.Engine, fn: Callable[[Session], T]) -> T:
    with session_scope(engine) as session:
        return fn(session)


def fund(engine: sa.Engine, user: str = "alice", amount: int = 100) -> None:
    tx(engine, lambda s: ledger.grant(s, user, amount, f"fund-{user}-{amount}"))


def submit(engine: sa.Engine, prices: PriceBook, prompt: str = "a red fox") -> int:
    return tx(
        engine,
        lambda s: (
            gens.submit(
                s, user_id="alice", model=SKETCH, input={"prompt": prompt}, prices=prices
            ).id
        ),
    )


def running(engine: sa.Engine, prices: PriceBook, prediction: str | None = None) -> int:
    gid = submit(engine, prices)
    tx(engine, lambda s: gens.start_attempt(s, gid, run_id="run-1", prices=prices))
    if prediction is not None:
        tx(engine, lambda s: gens.record_prediction(s, gid, prediction, SKETCH, "v1"))
    return gid


def row(engine: sa.Engine, gid: int) -> Generation:
    return tx(engine, lambda s: gens.get(s, gid))


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Everything a refused cancel must leave as it was."""

    def read(session: Session) -> dict[str, Any]:
        return {
            "generations": session.execute(
                sa.select(Generation.id, Generation.status, Generation.error_code)
            ).all(),
            "holds": session.execute(sa.select(Hold.id, Hold.status)).all(),
            "entries": session.scalar(sa.select(sa.func.count()).select_from(LedgerEntry)),
            "events": session.scalar(sa.select(sa.func.count()).select_from(GenerationEvent)),
        }

    return tx(engine, read)


def endings(engine: sa.Engine, hold_id: int) -> list[str]:
    return list(
        tx(
            engine,
            lambda s: s.scalars(
                sa.select(LedgerEntry.kind).where(
                    LedgerEntry.hold_id == hold_id, LedgerEntry.kind.in_(ENDING_KINDS)
                )
            ).all(),
        )
    )


def events(engine: sa.Engine, gid: int) -> list[str]:
    return list(
        tx(
            engine,
            lambda s: s.scalars(
                sa.select(GenerationEvent.status)
                .where(GenerationEvent.generation_id == gid)
                .order_by(GenerationEvent.id)
            ).all(),
        )
    )


def assert_clean(engine: sa.Engine) -> None:
    assert tx(engine, lambda s: [*ledger.verify(s), *gens.verify(s)]) == []


def assert_canceled_and_refunded(engine: sa.Engine, gid: int, user: str = "alice") -> None:
    got = row(engine, gid)
    assert (got.status, got.error_code, got.amount_charged) == (
        "canceled",
        "canceled_by_request",
        0,
    )
    assert got.hold_id is not None and endings(engine, got.hold_id) == ["release"]
    assert tx(engine, lambda s: ledger.balance(s, user)).held == 0
    assert events(engine, gid).count("canceled") == 1
    assert_clean(engine)


# --- the transition -----------------------------------------------------------------------------


def test_a_pending_generation_is_canceled_at_once_and_nothing_is_charged(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = submit(engine, prices)
    assert tx(engine, lambda s: ledger.balance(s, "alice")).available == 95
    done = tx(engine, lambda s: gens.cancel(s, gid))
    assert (done.changed, done.prediction_id) == (True, None)
    assert_canceled_and_refunded(engine, gid)
    assert events(engine, gid) == ["pending", "canceled"]
    assert tx(engine, lambda s: ledger.balance(s, "alice")) == ledger.Balance(
        balance=100, held=0, available=100
    )
    # The request sensor never claims it.
    claimed = tx(engine, lambda s: gens.claim_pending(s, limit=10, batch_key_fn=batch_key_for))
    assert claimed == []


def test_a_queued_generation_is_canceled_and_its_run_does_not_start_it(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = submit(engine, prices)
    tx(engine, lambda s: gens.claim_pending(s, limit=10, batch_key_fn=batch_key_for))
    assert tx(engine, lambda s: gens.cancel(s, gid)).changed
    started = tx(engine, lambda s: gens.start_attempt(s, gid, run_id="late", prices=prices))
    assert (started.status, started.dagster_run_id) == ("canceled", None)
    assert_canceled_and_refunded(engine, gid)
    assert events(engine, gid) == ["pending", "queued", "canceled"]


def test_a_running_generation_is_canceled_with_its_prediction_to_cancel(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = running(engine, prices, prediction="pred-1")
    done = tx(engine, lambda s: gens.cancel(s, gid))
    assert (done.changed, done.prediction_id) == (True, "pred-1")
    assert_canceled_and_refunded(engine, gid)
    # Finalize arrives late: refused, nothing charged.
    with pytest.raises(gens.InvalidTransition, match="canceled"):
        tx(
            engine,
            lambda s: gens.succeed(
                s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices, prediction_id="pred-1"
            ),
        )
    assert tx(engine, lambda s: ledger.balance(s, "alice")) == ledger.Balance(
        balance=100, held=0, available=100
    )


def test_a_repeated_cancel_changes_nothing(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine)
    gid = running(engine, prices, prediction="pred-1")
    tx(engine, lambda s: gens.cancel(s, gid))
    before = snapshot(engine)
    again = tx(engine, lambda s: gens.cancel(s, gid))
    assert (again.changed, again.prediction_id, again.row.status) == (False, "pred-1", "canceled")
    assert snapshot(engine) == before


def test_a_cancel_during_a_create_abandons_the_attempt_for_good(
    engine: sa.Engine, prices: PriceBook
) -> None:
    """Regression: ``create_lost`` and ``create_in_flight`` moved an abandoned attempt back to
    ``lost``/``creating``, so a create retried after its generation ended was sent anyway and
    the orphan sweep spared the prediction it made."""
    fund(engine)
    gid = running(engine, prices)
    tx(engine, lambda s: gens.begin_create(s, gid, attempt=1))
    tx(engine, lambda s: gens.create_in_flight(s, gid, 1, first=True))
    assert tx(engine, lambda s: gens.cancel(s, gid)).prediction_id is None
    attempt = tx(engine, lambda s: s.get_one(CreateAttempt, (gid, 1)))
    assert attempt.state == "abandoned"
    with pytest.raises(gens.InvalidTransition, match="canceled"):
        tx(engine, lambda s: gens.create_in_flight(s, gid, 1))
    tx(engine, lambda s: gens.create_lost(s, gid, 1))
    with pytest.raises(gens.InvalidTransition, match="should be canceled"):
        tx(engine, lambda s: gens.record_prediction(s, gid, "late-answer", SKETCH, "v1"))
    again = tx(engine, lambda s: s.get_one(CreateAttempt, (gid, 1)))
    assert (again.state, again.prediction_id) == ("abandoned", None)
    assert_canceled_and_refunded(engine, gid)


@pytest.mark.parametrize("ending", ["succeeded", "failed"])
def test_an_ended_generation_is_not_canceled(
    engine: sa.Engine, prices: PriceBook, ending: str
) -> None:
    fund(engine)
    gid = running(engine, prices, prediction="pred-1")
    if ending == "succeeded":
        tx(
            engine,
            lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices),
        )
    else:
        tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="boom"))
    before = snapshot(engine)
    with pytest.raises(gens.CannotCancel) as refused:
        tx(engine, lambda s: gens.cancel(s, gid))
    assert (refused.value.status, refused.value.finishing) == (ending, False)
    assert snapshot(engine) == before
    assert_clean(engine)


def test_a_prediction_that_succeeded_at_the_provider_is_completed_not_canceled(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    by_webhook = running(engine, prices, prediction="pred-webhook")
    seen = running(engine, prices, prediction="pred-seen")
    tx(
        engine,
        lambda s: s.add(
            PredictionState(prediction_id="pred-webhook", status="succeeded", payload={})
        ),
    )
    before = snapshot(engine)
    with pytest.raises(gens.CannotCancel) as refused:
        tx(engine, lambda s: gens.cancel(s, by_webhook))
    assert (refused.value.status, refused.value.finishing) == ("running", True)
    with pytest.raises(gens.CannotCancel):
        tx(engine, lambda s: gens.cancel(s, seen, provider_succeeded={"pred-seen"}))
    assert snapshot(engine) == before
    # A prediction the provider has not finished (or failed) does not stop the cancel.
    assert tx(engine, lambda s: gens.cancel(s, seen, provider_succeeded={"other"})).changed


def test_an_unknown_generation_is_reported(engine: sa.Engine) -> None:
    with pytest.raises(gens.UnknownGeneration):
        tx(engine, lambda s: gens.cancel(s, 12345))


# --- races --------------------------------------------------------------------------------------

ROUNDS = 12
THREADS = 6


def _race_round(engine: sa.Engine, prices: PriceBook, other: Callable[[int], object]) -> set[str]:
    """One generation, half the threads canceling it and half running ``other(gid)``: returns
    the ending it got, after checking its hold ended exactly once."""
    gid = running(engine, prices, prediction=f"pred-{time.monotonic_ns()}")

    def contender(i: int) -> object:
        if i % 2:
            return tx(engine, lambda s: gens.cancel(s, gid))
        return other(gid)

    results = race(THREADS, contender)
    unexpected = [
        r
        for r in results
        if isinstance(r, BaseException)
        and not isinstance(r, gens.CannotCancel | gens.InvalidTransition)
    ]
    assert unexpected == []
    got = row(engine, gid)
    assert got.hold_id is not None
    ended = endings(engine, got.hold_id)
    assert len(ended) == 1
    assert (got.status, ended[0]) in {
        ("canceled", "release"),
        ("failed", "release"),
        ("succeeded", "capture"),
    }
    cancels = [r for r in results if isinstance(r, gens.Cancellation) and r.changed]
    assert len(cancels) == (1 if got.status == "canceled" else 0)
    return {got.status}


def test_cancel_racing_finalize_ends_each_hold_once(engine: sa.Engine, prices: PriceBook) -> None:
    fund(engine, amount=1000)

    def finalize(gid: int) -> object:
        return tx(
            engine,
            lambda s: gens.succeed(s, gid, outputs=[OUTPUT], predict_time=1.0, prices=prices),
        )

    seen: set[str] = set()
    for _ in range(ROUNDS):
        seen |= _race_round(engine, prices, finalize)
    assert seen <= {"canceled", "succeeded"}
    assert_clean(engine)
    bal = tx(engine, lambda s: ledger.balance(s, "alice"))
    charged = tx(engine, lambda s: s.scalar(sa.select(sa.func.sum(Generation.amount_charged))))
    assert (bal.held, bal.balance) == (0, 1000 - (charged or 0))


def test_cancel_racing_the_refund_paths_ends_each_hold_once(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine, amount=1000)

    def fail(gid: int) -> object:
        return tx(engine, lambda s: gens.fail(s, gid, code="prediction_failed", message="race"))

    def refund_run(gid: int) -> object:
        # What the failure hook, the refund sensors and reconciliation call.
        return refund_unfinished(engine, run_id="run-1", code="run_failed", message="run died")

    for other in (fail, refund_run):
        for _ in range(ROUNDS):
            _race_round(engine, prices, other)
    assert_clean(engine)
    assert tx(engine, lambda s: ledger.balance(s, "alice")) == ledger.Balance(
        balance=1000, held=0, available=1000
    )


# --- the Python API against the emulator --------------------------------------------------------


def _stuck_prediction(client: ReplicateClient) -> str:
    return client.create(SKETCH, {"prompt": f"forever {STUCK_TRIGGER}"}).id


def _wait_status(client: ReplicateClient, pid: str, wanted: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(pid).status != wanted:
        assert time.monotonic() < deadline, f"{pid} never became {wanted}"
        time.sleep(0.05)


def test_cancel_generation_cancels_the_running_prediction_at_the_provider(
    engine: sa.Engine, prices: PriceBook, emulator: EmulatorHandle
) -> None:
    client = client_of(emulator)
    fund(engine)
    pid = _stuck_prediction(client)
    gid = running(engine, prices, prediction=pid)
    result = cancel.cancel_generation(engine, gid, client=client)
    assert (result.changed, result.prediction_id, result.provider) == (True, pid, "requested")
    assert result.generation["status"] == "canceled"
    _wait_status(client, pid, "canceled")
    assert_canceled_and_refunded(engine, gid)
    # Again: the same answer, the provider's cancel sent again (harmless), nothing else.
    again = cancel.cancel_generation(engine, gid, client=client)
    assert (again.changed, again.provider) == (False, "requested")
    assert_canceled_and_refunded(engine, gid)


def test_cancel_generation_refuses_once_the_provider_succeeded(
    engine: sa.Engine, prices: PriceBook, emulator: EmulatorHandle
) -> None:
    client = client_of(emulator)
    fund(engine)
    pid = client.create(SKETCH, {"prompt": "quick"}).id
    _wait_status(client, pid, "succeeded")
    gid = running(engine, prices, prediction=pid)
    before = snapshot(engine)
    with pytest.raises(gens.CannotCancel) as refused:
        cancel.cancel_generation(engine, gid, client=client)
    assert refused.value.finishing and refused.value.status == "running"
    assert snapshot(engine) == before


def test_cancel_generation_without_a_provider_client_still_cancels(
    engine: sa.Engine, prices: PriceBook
) -> None:
    fund(engine)
    gid = running(engine, prices, prediction="pred-1")
    result = cancel.cancel_generation(engine, gid, client=None)
    assert (result.changed, result.provider) == (True, "not_attempted")
    assert_canceled_and_refunded(engine, gid)


# --- the command line ---------------------------------------------------------------------------


def test_the_cli_cancels_and_refuses_like_the_api(
    db_url: str, engine: sa.Engine, prices: PriceBook, capsys: pytest.CaptureFixture[str]
) -> None:
    fund(engine)
    gid = submit(engine, prices)
    assert cli.main(["cancel", str(gid), "--url", db_url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["changed"], out["generation"]["status"], out["provider"]) == (
        True,
        "canceled",
        "none",
    )
    assert cli.main(["cancel", str(gid), "--url", db_url]) == 0
    assert f"generation {gid} was already canceled" in capsys.readouterr().out
    done = running(engine, prices, prediction="pred-1")
    tx(engine, lambda s: gens.succeed(s, done, outputs=[OUTPUT], predict_time=1.0, prices=prices))
    before = snapshot(engine)
    assert cli.main(["cancel", str(done), "--url", db_url]) == 2
    assert f"generation {done} already succeeded" in capsys.readouterr().err
    assert cli.main(["cancel", "999", "--url", db_url]) == 2
    assert "unknown generation 999" in capsys.readouterr().err
    assert cli.main(["cancel", "x1", "--url", db_url]) == 2
    assert snapshot(engine) == before
    assert_clean(engine)


# --- through the generation job -----------------------------------------------------------------


@pytest.fixture
def job_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, DagsterInstance]]:
    """A migrated SQLite app database and a Dagster instance for in-process runs."""
    from ai_handler_dagster.db import upgrade

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    url = f"sqlite:///{tmp_path_factory.mktemp('cancel-run') / 'app.db'}"
    upgrade(url)
    with instance_for_test() as instance:
        yield url, instance


STEPS = ["before_run", "before_create", "create_in_flight", "awaiting", "succeeded", "finalize"]


@pytest.mark.parametrize("step", STEPS)
def test_a_run_copes_with_a_generation_canceled_at_any_step(
    step: str,
    job_env: tuple[str, DagsterInstance],
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, instance = job_env
    engine = make_engine(url)
    prices = load_pricing()
    client = client_of(emulator)
    fund(engine)
    # The provider's success matters for the last two steps; before it, the prediction runs
    # until canceled, so the cancel always finds it running.
    finished = step in ("succeeded", "finalize")
    victim_prompt = "to cancel" if finished else f"to cancel {STUCK_TRIGGER}"
    victim = submit(engine, prices, victim_prompt)
    neighbour = submit(engine, prices, "to keep")
    ids = [
        r.id
        for r in tx(engine, lambda s: gens.claim_pending(s, limit=10, batch_key_fn=batch_key_for))
    ]
    assert ids == [victim, neighbour]
    canceled = threading.Event()

    def cancel_victim() -> None:
        if canceled.is_set():
            return
        canceled.set()
        if finished:
            # The cancel won the race against the news of the provider's success (the Python
            # API would refuse once it sees it): the transition alone, as it then runs.
            assert tx(engine, lambda s: gens.cancel(s, victim)).changed
        else:
            assert cancel.cancel_generation(engine, victim, client=client).changed

    if step == "before_run":
        cancel_victim()
    elif step == "before_create":
        real_obtain = adoption.obtain

        def obtain(engine_: sa.Engine, client_: Any, attempt: adoption.Attempt, **kw: Any) -> Any:
            if attempt.generation_id == victim:
                cancel_victim()
            return real_obtain(engine_, client_, attempt, **kw)

        monkeypatch.setattr(adoption, "obtain", obtain)
    elif step == "create_in_flight":
        real_create = ReplicateClient.create

        def create(self: ReplicateClient, model: str, input: Any, **kw: Any) -> Any:
            made = real_create(self, model, input, **kw)
            if input.get("prompt") == victim_prompt:
                cancel_victim()  # after the create was sent, before its answer is recorded
            return made

        monkeypatch.setattr(ReplicateClient, "create", create)
    elif step == "awaiting":

        def when_created() -> None:
            deadline = time.monotonic() + 30
            while row(engine, victim).prediction_id is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            cancel_victim()

        threading.Thread(target=when_created, daemon=True).start()
    elif step == "succeeded":
        real_error = generation_ops.snapshot_error

        def snapshot_error(snap: Any) -> Any:
            if row(engine, victim).prediction_id == snap.id:
                cancel_victim()  # the provider succeeded, the run has not stored anything yet
            return real_error(snap)

        monkeypatch.setattr(generation_ops, "snapshot_error", snapshot_error)
    else:
        real_succeed = gens.succeed

        def succeed(session: Session, generation_id: int, **kw: Any) -> Any:
            if generation_id == victim:
                cancel_victim()  # stored, not yet finalized (nothing locked by this session yet)
            return real_succeed(session, generation_id, **kw)

        monkeypatch.setattr(gens, "succeed", succeed)

    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(url, emulator, local_s3, bucket),
        instance=instance,
    )
    assert result.success and canceled.is_set()
    assert_canceled_and_refunded(engine, victim)
    kept = row(engine, neighbour)
    assert (kept.status, kept.amount_charged) == ("succeeded", 5)
    assert tx(engine, lambda s: ledger.balance(s, "alice")) == ledger.Balance(
        balance=95, held=0, available=95
    )
    # Only the neighbour's outputs are stored (a canceled generation's are deleted or never
    # written), and the victim ended once: no event after its cancel.
    keys = [o["Key"] for o in local_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in keys if k.startswith("generations/")] == [
        f"generations/{neighbour}/a1/0.png"
    ]
    assert events(engine, victim)[-1] == "canceled"
    # The victim's prediction, if one was made, is not left running at the provider.
    victims = [p for p in emulator.predictions() if p["input"].get("prompt") == victim_prompt]
    if step in ("before_run", "before_create"):
        assert victims == []
    else:
        assert len(victims) == 1
        _wait_status(client, victims[0]["id"], "succeeded" if finished else "canceled")
    # The refund paths (failure hook, sensors, reconciliation) find nothing left to settle.
    before = snapshot(engine)
    assert refund_unfinished(engine, run_id=result.run_id, code="run_failed", message="x") == []
    batch = row(engine, victim).batch_key
    assert refund_unfinished(engine, batch_key=batch, code="run_failed", message="x") == []
    assert snapshot(engine) == before
    assert_clean(engine)
