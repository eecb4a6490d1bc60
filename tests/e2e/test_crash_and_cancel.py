"""End to end: a run whose worker dies, and a run an operator cancels, while a paid prediction
is in flight. A real ``dagster-daemon`` runs them; the emulator's model takes seconds, so each
run is caught mid-prediction.

Proves that:

- a run worker killed with SIGKILL is noticed by run monitoring within a few polls (the embedded
  launcher checks the worker's pid; without it the run would stay ``STARTED`` until the maximum
  runtime), and the run then either resumes through Dagster's run retry or is refunded; either
  way there is one hold, settled once, and one paid prediction for the attempt;
- when the warm process the worker was forked from dies together with it (so nothing reports the
  worker's death), run monitoring still fails the run within a few polls, through the launcher's
  pid check, and the run's generation is then settled once (a new warm process serves the retry);
- a run canceled through the instance ends ``CANCELED`` without its step being retried, its
  generation ends ``canceled`` with its hold released exactly once, and its prediction is
  canceled on Replicate;
- the ledger verifies clean after each.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.launcher import WorkerStatus

from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.runtime.launcher import process_alive, recorded_worker_pid
from tests.support.stack import (
    App,
    StackUnderTest,
    dagster_instance,
    emulator,
    predictions_with_prompt,
    run_events,
    running_stack,
    runs_of_batch,
    stack_config,
    unique,
    wait_batch_runs_finished,
    wait_for,
)

pytestmark = pytest.mark.e2e

GRANT = 100
PIXEL_PRICE = 5
#: Long enough that the run is still waiting on the prediction when the test acts on it.
SLOW_MODEL_S = 8.0
#: The instance's run monitoring polls every 3 s; allow for a busy machine, not for a timeout.
DETECTION_BOUND_S = 20.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackUnderTest]:
    config = stack_config(tmp_path_factory.mktemp("stack-crash"), latency_s=SLOW_MODEL_S)
    with running_stack(config) as stack:
        yield StackUnderTest(stack, App(stack.app_db_url))


@pytest.fixture
def instance(env: StackUnderTest) -> Iterator[DagsterInstance]:
    with dagster_instance(env.stack) as inst:
        yield inst


def start_one(env: StackUnderTest, label: str) -> tuple[str, str, int]:
    """Grant a new user credits and insert one image request; returns (user, prompt, id)."""
    user = unique(label)
    env.app.grant(user, GRANT)
    prompt = f"a slow {label} ({user})"
    return user, prompt, env.app.insert(user, "demo/pixel-sketch", {"prompt": prompt})


def wait_mid_prediction(
    env: StackUnderTest, instance: DagsterInstance, generation_id: int
) -> tuple[Generation, DagsterRun]:
    """Wait until the generation's prediction is processing (paid) and return its row and run."""

    def processing() -> Generation | None:
        row = env.app.row(generation_id)
        if row.status != "running" or not row.prediction_id:
            return None
        with emulator(env.stack) as control:
            states = {p["id"]: p["status"] for p in control.predictions()}
        return row if states.get(row.prediction_id) == "processing" else None

    row = wait_for(
        processing,
        timeout_s=120,
        what=f"generation {generation_id} to have a processing prediction",
        describe=lambda: env.app.row(generation_id).status,
    )
    assert row.batch_key is not None
    [run] = runs_of_batch(instance, row.batch_key)
    assert run.status == DagsterRunStatus.STARTED
    return row, run


def crash_detected(instance: DagsterInstance, run_id: str, pid: int) -> float | None:
    """When Dagster first noticed that the run's worker died: the code server's report of its
    child's death, or run monitoring's verdict from the launcher's pid check."""
    records = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.ENGINE_EVENT, DagsterEventType.RUN_FAILURE}
    ).records
    for record in records:
        entry = record.event_log_entry
        message = entry.dagster_event.message if entry.dagster_event else ""
        if "terminated by signal 9" in (message or "") or f"run worker process {pid} is gone" in (
            message or ""
        ):
            return entry.timestamp
    return None


def test_a_killed_run_worker_is_detected_and_settled_once(
    env: StackUnderTest, instance: DagsterInstance
) -> None:
    stack, app = env.stack, env.app
    user, prompt, gid = start_one(env, "crash")
    row, run = wait_mid_prediction(env, instance, gid)

    pid = wait_for(
        lambda: recorded_worker_pid(instance, run.run_id),
        timeout_s=30,
        what=f"the worker pid of run {run.run_id}",
    )
    # Only ever kill a process this stack started (its daemon's code server runs the workers).
    assert pid in stack.pids(), f"pid {pid} is not a process of the stack"
    # The launcher finds the worker by the pid its process recorded, and sees it alive ...
    launcher = instance.run_launcher
    assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    # ... and dead once the kill lands (even while a zombie its parent has not reaped yet).
    health = wait_for(
        lambda: (h := launcher.check_run_worker_health(run)).status == WorkerStatus.FAILED and h,
        timeout_s=5,
        what=f"the launcher to see worker {pid} gone",
    )
    assert health.msg == f"run worker process {pid} is gone"

    detected_at = wait_for(
        lambda: crash_detected(instance, run.run_id, pid),
        timeout_s=60,
        what=f"Dagster to notice that the worker of run {run.run_id} died",
        describe=lambda: run_events(instance, run.run_id)[-3:],
    )
    assert detected_at - killed_at < DETECTION_BOUND_S

    final = app.wait_terminal([gid])[gid]
    runs = wait_batch_runs_finished(instance, row.batch_key or "")
    statuses = [r.status for r in runs]
    print(f"after the kill: generation {final.status}; runs {[s.value for s in statuses]}")
    assert statuses[0] == DagsterRunStatus.FAILURE

    # One attempt, one hold, one paid prediction: whatever path settled it.
    assert final.attempt == 1
    [hold] = app.holds(gid)
    paid = [p for p in predictions_with_prompt(stack, prompt) if p["_emulator"]["paid"]]
    assert [p["id"] for p in paid] == [row.prediction_id]
    balance = app.balance(user)
    if final.status == "succeeded":
        # Resumed by Dagster's run retry: the retry awaited the same prediction and charged once.
        assert statuses == [DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS]
        assert runs[1].tags.get("dagster/parent_run_id") == run.run_id
        assert app.entry_kinds(hold.id) == ["hold", "capture"]
        assert (balance.balance, balance.held) == (GRANT - PIXEL_PRICE, 0)
    else:
        assert final.status == "failed", (final.status, final.error_code)
        assert app.entry_kinds(hold.id) == ["hold", "release"]
        assert (balance.balance, balance.held) == (GRANT, 0)
    assert app.violations() == []


def test_a_canceled_run_refunds_once_and_cancels_its_prediction(
    env: StackUnderTest, instance: DagsterInstance
) -> None:
    stack, app = env.stack, env.app
    with emulator(stack) as control:
        # Longer still: the prediction must outlive the cancel and the refund that follows it.
        control.configure(latency_s=45.0)
        try:
            user, prompt, gid = start_one(env, "cancel")
            row, run = wait_mid_prediction(env, instance, gid)
        finally:
            control.configure(latency_s=SLOW_MODEL_S)

    instance.run_coordinator.cancel_run(run.run_id)

    [ended] = wait_batch_runs_finished(instance, row.batch_key or "", timeout_s=90)
    events = run_events(instance, run.run_id)
    # Regression: the interrupt of the termination used to become a retry of the step (the
    # ops' retry policy), and the run went on to succeed and charge as if never canceled.
    assert not [e for e in events if e.startswith("STEP_UP_FOR_RETRY")], events
    assert ended.status == DagsterRunStatus.CANCELED, events
    final = app.wait_terminal([gid])[gid]
    assert (final.status, final.amount_charged) == ("canceled", 0), final.error_message

    [hold] = app.holds(gid)
    assert hold.status == "released"
    assert app.entry_kinds(hold.id) == ["hold", "release"]
    balance = app.balance(user)
    assert (balance.balance, balance.held) == (GRANT, 0)

    # The refund canceled the paid prediction on Replicate rather than letting it run on.
    def prediction_canceled() -> bool:
        [prediction] = predictions_with_prompt(stack, prompt)
        return prediction["status"] == "canceled"

    wait_for(
        prediction_canceled,
        timeout_s=30,
        what=f"prediction {row.prediction_id} to be canceled",
        describe=lambda: predictions_with_prompt(stack, prompt)[0]["status"],
    )
    assert app.violations() == []


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_run_monitoring_fails_a_run_whose_worker_died_with_its_parent(
    env: StackUnderTest, instance: DagsterInstance
) -> None:
    """The launcher's own check: the warm process the worker was forked from is gone too, so only
    run monitoring (``LocalRunLauncher.check_run_worker_health``) can notice. Without it the run
    would stay ``STARTED`` until the maximum runtime (30 minutes) and hold the credits. The next
    launch starts a new warm process, so the retried run (or the refund) settles the generation."""
    stack, app = env.stack, env.app
    user, prompt, gid = start_one(env, "orphan")
    row, run = wait_mid_prediction(env, instance, gid)
    pid = wait_for(
        lambda: recorded_worker_pid(instance, run.run_id), timeout_s=30, what="the worker pid"
    )
    server = parent_pid(pid)
    with open(f"/proc/{server}/cmdline", "rb") as cmdline:
        assert b"forkserver" in cmdline.read(), "the worker's parent is not the warm process"
    assert {pid, server} <= set(stack.pids())

    os.kill(server, signal.SIGKILL)
    wait_for(lambda: not process_alive(server), timeout_s=10, what="the warm process to die")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)

    def failed() -> DagsterRun | None:
        current = instance.get_run_by_id(run.run_id)
        return current if current and current.status == DagsterRunStatus.FAILURE else None

    wait_for(
        failed,
        timeout_s=60,
        what=f"run monitoring to fail run {run.run_id}",
        describe=lambda: run_events(instance, run.run_id)[-3:],
    )
    records = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.RUN_FAILURE, limit=1
    ).records
    entry = records[0].event_log_entry
    message = entry.dagster_event.message if entry.dagster_event else ""
    assert f"run worker process {pid} is gone" in (message or ""), message
    assert entry.timestamp - killed_at < DETECTION_BOUND_S

    # The refund sensor (or a retry, forked from a new warm process) settles it.
    final = app.wait_terminal([gid], timeout_s=240)
    [hold] = app.holds(gid)
    paid = [p for p in predictions_with_prompt(stack, prompt) if p["_emulator"]["paid"]]
    assert [p["id"] for p in paid] == [row.prediction_id]
    balance = app.balance(user)
    if final[gid].status == "succeeded":
        assert app.entry_kinds(hold.id) == ["hold", "capture"]
        assert (balance.balance, balance.held) == (GRANT - PIXEL_PRICE, 0)
    else:
        assert app.entry_kinds(hold.id) == ["hold", "release"]
        assert (balance.balance, balance.held) == (GRANT, 0)
    assert app.violations() == []


def test_a_batch_survives_two_crashes_within_its_budget(
    env: StackUnderTest, instance: DagsterInstance
) -> None:
    """Regression: with one run retry, a batch whose run and its retry were both killed ended
    ``run_failed`` and was refunded, though its prediction finished at the provider (14 to 26 of
    300 generations per chaos seed). Each retry resumes with the same hold and prediction,
    until ``run_retries.max_retries`` (3) crashes are spent."""
    stack, app = env.stack, env.app
    with emulator(stack) as control:
        control.configure(latency_s=40.0)  # still running through both crashes
        try:
            user, prompt, gid = start_one(env, "twice")
            row, _run = wait_mid_prediction(env, instance, gid)
        finally:
            control.configure(latency_s=SLOW_MODEL_S)
    batch = row.batch_key or ""
    killed: list[str] = []

    def next_started() -> DagsterRun | None:
        started = [
            r
            for r in runs_of_batch(instance, batch)
            if r.status == DagsterRunStatus.STARTED and r.run_id not in killed
        ]
        return started[0] if started else None

    for crash in (1, 2):
        current = wait_for(next_started, timeout_s=90, what=f"run {crash} of batch {batch}")
        pid = wait_for(
            lambda current=current: recorded_worker_pid(instance, current.run_id),
            timeout_s=30,
            what=f"the worker pid of run {current.run_id}",
        )
        assert pid in stack.pids(), f"pid {pid} is not a process of the stack"
        os.kill(pid, signal.SIGKILL)
        killed.append(current.run_id)
        wait_for(
            lambda current=current: (
                instance.get_run_by_id(current.run_id).status  # type: ignore[union-attr]
                == DagsterRunStatus.FAILURE
            ),
            timeout_s=60,
            what=f"run {current.run_id} to be failed by run monitoring",
        )
    final = app.wait_terminal([gid], timeout_s=180)[gid]
    assert (final.status, final.attempt) == ("succeeded", 1), (final.status, final.error_code)
    runs = wait_batch_runs_finished(instance, batch)
    assert [r.status for r in runs] == [
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.SUCCESS,
    ]
    [hold] = app.holds(gid)
    assert app.entry_kinds(hold.id) == ["hold", "capture"]
    paid = [p for p in predictions_with_prompt(stack, prompt) if p["_emulator"]["paid"]]
    assert [p["id"] for p in paid] == [row.prediction_id]
    balance = app.balance(user)
    assert (balance.balance, balance.held) == (GRANT - PIXEL_PRICE, 0)
    assert app.violations() == []
