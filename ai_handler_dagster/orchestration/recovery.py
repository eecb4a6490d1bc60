"""Refunds for generations whose run cannot finish them: the whole story in one module.

Four paths lead here, and all of them may fire for the same generation:

- the failure hook (``refund_on_failure``): an op of a generation run failed for good;
- the run-failure sensor: the run failed, or its worker crashed and run monitoring gave up on it;
- the run-canceled sensor;
- the reconciliation job, every 5 minutes: anything the others missed (expired holds, batches
  whose run ended or never started, retries Dagster promised and never made, orphan predictions),
  and the provider's cost of predictions whose run ended before it saw them end.

Exactly one refund happens because ``generations.fail`` releases a hold only while it is pending,
under a row lock, in the same transaction that marks the generation terminal. None of the paths
settles a run Dagster is about to retry (``runtime.run_retries``): the retry resumes it.
"""

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from dagster import DagsterRunStatus as RunStatus
from dagster import (
    DefaultScheduleStatus,
    DefaultSensorStatus,
    HookContext,
    JobDefinition,
    OpExecutionContext,
    RunsFilter,
    RunStatusSensorContext,
    ScheduleDefinition,
    SensorDefinition,
    failure_hook,
    in_process_executor,
    job,
    op,
    run_status_sensor,
)

from ai_handler_dagster import adoption, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.domain import IN_FLIGHT, GenerationStatus, RunTag
from ai_handler_dagster.errors import DEADLINE_EXCEEDED, RUN_FAILED, GenerationError
from ai_handler_dagster.pricing import PriceBook
from ai_handler_dagster.replicate.client import ReplicateClient
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.runtime.run_retries import retry_overdue, will_be_retried
from ai_handler_dagster.webhooks import store as webhook_store

log = logging.getLogger(__name__)

#: How often a batch is resumed (Dagster promised a retry and none came) before its generations
#: are refunded instead.
MAX_RESUMES = 3
#: How far back each reconciliation looks for orphan predictions (it runs every 5 minutes).
ORPHAN_LOOKBACK = timedelta(minutes=15)
#: A queued generation whose batch has no run after this long is considered lost.
LOST_BATCH_AFTER = timedelta(minutes=10)
#: How far back reconciliation prices predictions nobody saw end, and how many per run (one
#: GET each, well inside the provider's request budget).
COST_LOOKBACK = timedelta(hours=24)
COST_SWEEP_LIMIT = 100


# --- settling unfinished generations -----------------------------------------------------------


def unfinished_generations(
    engine: sa.Engine, *, run_id: str | None = None, batch_key: str | None = None
) -> list[tuple[int, int, str | None]]:
    """(id, attempt, prediction id) of the unfinished generations of a run or of a batch."""
    matches = []
    if run_id:
        matches.append(Generation.dagster_run_id == run_id)
    if batch_key:
        matches.append(Generation.batch_key == batch_key)
    if not matches:
        return []
    with session_scope(engine) as session:
        rows = session.execute(
            sa.select(Generation.id, Generation.attempt, Generation.prediction_id)
            .where(Generation.status.in_(IN_FLIGHT), sa.or_(*matches))
            .order_by(Generation.id)
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def _cancel_quietly(cancel: Callable[[str], object] | None, prediction_id: str | None) -> None:
    """Cancel a prediction, best effort: a refund must not depend on the provider being up, and
    one that cannot be canceled now is caught by the next reconciliation."""
    if prediction_id and cancel is not None:
        try:
            cancel(prediction_id)
        except Exception as exc:
            log.warning("could not cancel prediction %s: %s", prediction_id, exc)


def refund_unfinished(
    engine: sa.Engine,
    *,
    run_id: str | None = None,
    batch_key: str | None = None,
    code: str,
    message: str,
    status: str = GenerationStatus.FAILED,
    cancel_prediction: Callable[[str], object] | None = None,
) -> list[int]:
    """Fail every unfinished generation of a run (or batch) and release its hold.

    Predictions still running on Replicate are canceled first. Returns the ids this call
    refunded; ids another path already settled are left alone.
    """
    refunded: list[int] = []
    for generation_id, attempt, prediction_id in unfinished_generations(
        engine, run_id=run_id, batch_key=batch_key
    ):
        _cancel_quietly(cancel_prediction, prediction_id)
        # The attempt read above only: one requeued and restarted meanwhile is not this run's.
        with session_scope(engine) as session:
            try:
                ended = gens.fail(
                    session,
                    generation_id,
                    code=code,
                    message=message,
                    status=status,
                    attempt=attempt,
                )
            except gens.AttemptMismatch:
                continue
        if ended:
            refunded.append(generation_id)
    return refunded


def refund_expired(
    engine: sa.Engine, generation_id: int, cancel_prediction: Callable[[str], object] | None
) -> None:
    """Fail a generation whose hold expired (the hold is already released) and cancel its
    prediction."""
    with session_scope(engine) as session:
        row = session.get(Generation, generation_id)
        prediction_id = row.prediction_id if row else None
    _cancel_quietly(cancel_prediction, prediction_id)
    with session_scope(engine) as session:
        gens.fail(session, generation_id, code=DEADLINE_EXCEEDED, message="credit hold expired")


def price_unseen_predictions(
    engine: sa.Engine,
    client: ReplicateClient,
    prices: PriceBook,
    *,
    since: datetime,
    limit: int = COST_SWEEP_LIMIT,
) -> int:
    """Record the provider's cost of ended attempts whose prediction nobody saw end (their run
    died and a refund path settled them, canceling the prediction): one GET per prediction,
    once it is terminal. Returns how many were priced. A prediction the provider no longer
    knows stays unknown; a transient provider error stops the sweep (next time)."""
    with session_scope(engine) as session:
        pending = gens.attempts_without_cost(session, since=since, limit=limit)
    priced = 0
    for generation_id, attempt, prediction_id, model in pending:
        price = prices.find(model)
        snapshot = None
        if price is not None and price.provider is not None:
            try:
                snapshot = client.get(prediction_id)
            except GenerationError as exc:
                log.warning("could not read prediction %s for its cost: %s", prediction_id, exc)
                if exc.retryable:
                    break
                with session_scope(engine) as session:
                    gens.cost_unknown(
                        session, generation_id, attempt=attempt, prediction_id=prediction_id
                    )
                continue
            if not snapshot.is_terminal:
                continue  # still canceling: next time
        with session_scope(engine) as session:
            gens.record_provider_cost(
                session,
                generation_id,
                attempt=attempt,
                prediction_id=prediction_id,
                prices=prices,
                status=snapshot.status if snapshot else "unknown",
                output=snapshot.output if snapshot else None,
                metrics=snapshot.metrics if snapshot else None,
                never_started=snapshot.never_started if snapshot else False,
            )
        priced += snapshot is not None
    return priced


def resume_batch(engine: sa.Engine, batch_key: str) -> tuple[str, list[int]] | None:
    """Requeue a batch's unfinished generations under a new batch key (``<key>-r<n>``), with
    their holds, predictions and attempts, for the request sensor to start a new run; None once
    the batch was resumed ``MAX_RESUMES`` times (its generations are then refunded)."""
    base, sep, count = batch_key.rpartition("-r")
    if not (sep and count.isdigit()):
        base, count = batch_key, "0"
    if int(count) >= MAX_RESUMES:
        return None
    new_key = f"{base}-r{int(count) + 1}"
    resumed = []
    for generation_id, _attempt, _prediction in unfinished_generations(engine, batch_key=batch_key):
        with session_scope(engine) as session:
            if gens.resume(session, generation_id, batch_key=new_key):
                resumed.append(generation_id)
    return new_key, resumed


# --- the failure hook ---------------------------------------------------------------------------


@failure_hook(required_resource_keys={"database", "replicate"})
def refund_on_failure(context: HookContext) -> None:
    """The fast path: when an op of a generation run fails for good, fail and refund the run's
    unfinished generations at once, before the run itself is marked failed (idempotent)."""
    run = context.instance.get_run_by_id(context.run_id)
    batch_key = run.tags.get(RunTag.BATCH) if run else None
    error = context.op_exception
    reason = f"{type(error).__name__}: {error}" if error else "op failed"
    # A step that failed because an operator terminated the run ends its generations canceled.
    terminated = run is not None and run.status in (RunStatus.CANCELING, RunStatus.CANCELED)
    refunded = refund_unfinished(
        context.resources.database.engine(),
        run_id=context.run_id,
        batch_key=batch_key,
        code=RUN_FAILED,
        message=f"step {context.step_key} failed: {reason}"[:1000],
        status=GenerationStatus.CANCELED if terminated else GenerationStatus.FAILED,
        cancel_prediction=context.resources.replicate.get_client().cancel,
    )
    if refunded:
        context.log.warning(f"refunded generations {refunded} after step {context.step_key} failed")


# --- the refund sensors -------------------------------------------------------------------------


def _refund_run(
    context: RunStatusSensorContext,
    database: DatabaseResource,
    replicate: ReplicateResource,
    *,
    status: GenerationStatus,
) -> None:
    run = context.dagster_run
    if will_be_retried(context.instance, run):
        context.log.info(f"run {run.run_id} will be retried by Dagster; not refunding")
        return
    refunded = refund_unfinished(
        database.engine(),
        run_id=run.run_id,
        batch_key=run.tags.get(RunTag.BATCH),
        code=RUN_FAILED,
        message=f"run {run.run_id} ended {run.status.value} before this generation finished",
        status=status,
        cancel_prediction=replicate.get_client().cancel,
    )
    if refunded:
        context.log.warning(f"run {run.run_id} {run.status.value}: refunded {refunded}")


def refund_sensors(generation_job: JobDefinition) -> list[SensorDefinition]:
    """The sensors that refund the unfinished generations of ``generation_job``'s runs that
    failed (or crashed: run monitoring fails them) and of those that were canceled."""

    def refund_sensor(
        name: str, ended: RunStatus, status: GenerationStatus, description: str
    ) -> SensorDefinition:
        @run_status_sensor(
            name=name,
            run_status=ended,
            monitored_jobs=[generation_job],
            default_status=DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=5,
            description=description,
        )
        def refund(
            context: RunStatusSensorContext,
            database: DatabaseResource,
            replicate: ReplicateResource,
        ) -> None:
            _refund_run(context, database, replicate, status=status)

        return refund

    return [
        refund_sensor(
            "refund_failed_runs",
            RunStatus.FAILURE,
            GenerationStatus.FAILED,
            "Refunds the unfinished generations of failed or crashed generation runs.",
        ),
        refund_sensor(
            "refund_canceled_runs",
            RunStatus.CANCELED,
            GenerationStatus.CANCELED,
            "Refunds the unfinished generations of canceled generation runs.",
        ),
    ]


# --- reconciliation -----------------------------------------------------------------------------


def _settle_batches(
    context: OpExecutionContext, engine: sa.Engine, replicate: ReplicateResource, now: datetime
) -> tuple[int, int]:
    """Unfinished generations whose run is over or missing: resumed when Dagster promised a
    retry that never came, else failed and refunded. Returns (settled, resumed)."""
    with session_scope(engine) as session:
        batches = session.execute(
            sa.select(Generation.batch_key, sa.func.min(Generation.queued_at))
            .where(Generation.status.in_(IN_FLIGHT), Generation.batch_key.is_not(None))
            .group_by(Generation.batch_key)
            .limit(500)
        ).all()
    settled = resumed_count = 0
    for batch_key, queued_at in batches:
        runs = context.instance.get_runs(filters=RunsFilter(tags={RunTag.BATCH: str(batch_key)}))
        if any(not run.is_finished for run in runs):
            continue
        if runs and will_be_retried(context.instance, runs[0]):
            if not retry_overdue(context.instance, runs[0], now):
                continue  # Dagster is about to re-execute it; the retry resumes these generations
            resumed = resume_batch(engine, str(batch_key))
            if resumed is not None:
                new_key, ids = resumed
                context.log.warning(
                    f"run {runs[0].run_id} was to be retried but no retry came: batch "
                    f"{batch_key} resumed as {new_key} ({len(ids)} generations)"
                )
                resumed_count += len(ids)
                continue
        if not runs and queued_at is not None and now - queued_at < LOST_BATCH_AFTER:
            continue  # the sensor may still be launching it
        ended = runs[0].status.value if runs else "missing"
        canceled = bool(runs) and runs[0].status == RunStatus.CANCELED
        settled += len(
            refund_unfinished(
                engine,
                batch_key=batch_key,
                code=RUN_FAILED,
                message=f"run of batch {batch_key} is {ended}; settled by reconciliation",
                status=GenerationStatus.CANCELED if canceled else GenerationStatus.FAILED,
                cancel_prediction=replicate.get_client().cancel,
            )
        )
    return settled, resumed_count


@op
def reconcile(
    context: OpExecutionContext,
    database: DatabaseResource,
    replicate: ReplicateResource,
    pricing: PricingResource,
) -> dict[str, int]:
    """Settle what every other path missed: expired holds, and unfinished generations whose run
    has ended (or never existed); cancel orphan predictions; record the provider's cost of
    predictions nobody saw end; prune webhook records older than ``webhooks.store.RETENTION``.
    Predictions still running on Replicate are canceled."""
    engine = database.engine()
    now = datetime.now(UTC)

    # 1. Holds past their deadline: expire them and fail their generations.
    with session_scope(engine) as session:
        expired = ledger.expire(session)
        expired_gens = [h.generation_id for h in expired if h.generation_id is not None]
    for generation_id in expired_gens:
        refund_expired(engine, generation_id, replicate.get_client().cancel)

    # 2. Unfinished generations whose run is over or missing.
    settled, resumed = _settle_batches(context, engine, replicate, now)

    # 3. Orphans: running predictions one of our attempts made that no attempt owns.
    try:
        orphans = adoption.cancel_orphans(
            engine, replicate.get_client(), since=now - ORPHAN_LOOKBACK, log=context.log.warning
        )
    except GenerationError as exc:  # the provider's list is unreadable now: next time
        context.log.warning(f"orphan sweep skipped: {exc}")
        orphans = []
    # 4. What the provider charged for predictions a dead run never saw end.
    priced = price_unseen_predictions(
        engine, replicate.get_client(), pricing.book(), since=now - COST_LOOKBACK
    )
    # 5. What webhooks reported, once nobody will read it again.
    deliveries, states = webhook_store.prune(engine)
    result = {
        "expired_holds": len(expired),
        "settled_generations": settled,
        "resumed_generations": resumed,
        "canceled_orphans": len(orphans),
        "priced_predictions": priced,
        "pruned_webhook_records": deliveries + states,
    }
    context.add_output_metadata(result)
    return result


@job(executor_def=in_process_executor, description="Settle stuck generations and expired holds.")
def reconcile_job() -> None:
    reconcile()


reconcile_schedule = ScheduleDefinition(
    name="reconcile_every_5_minutes",
    job=reconcile_job,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "Fails and refunds generations stuck in queued/running whose run ended or never started, "
        "expires holds past their deadline, and cancels their predictions on Replicate."
    ),
)
