"""The generation job: what a run does, one op per step, for a batch of generations.

reserve_credits -> create_predictions -> await_predictions -> store_outputs -> finalize

Each op handles the whole batch, with the generations progressing concurrently inside the op (the
in-process executor runs ops one after another). Each generation succeeds or fails on its own: a
generation that fails at any step is failed and refunded right there, in one database transaction
with its ledger entry, and leaves the batch; its neighbours go on. Only an infrastructure failure
(the app database unreachable, S3 down) fails an op, and the op's retry policy or the failure hook
takes over from there.

Every step is idempotent, so an op retry or a re-executed run repeats no paid work: a generation
already holding credits keeps its hold, one with a prediction keeps polling it, and S3 keys are
deterministic.
"""

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from functools import wraps
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from dagster import (
    Backoff,
    Config,
    DagsterExecutionInterruptedError,
    ExecutorDefinition,
    Failure,
    In,
    Jitter,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Out,
    ResourceParam,
    RetryPolicy,
    RunConfig,
    in_process_executor,
    job,
    op,
)
from pydantic import Field

from ai_handler_dagster import adoption, ledger, lifetimes, retries, settings, throttle
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import CreateAttempt, Generation, utcnow
from ai_handler_dagster.domain import GenerationStatus, PredictionStatus, RunTag
from ai_handler_dagster.errors import EMPTY_OUTPUT, INTERNAL_ERROR, GenerationError
from ai_handler_dagster.orchestration.recovery import refund_on_failure
from ai_handler_dagster.provider_costs import format_usd, margin_usd, nano_to_usd
from ai_handler_dagster.replicate.snapshot import snapshot_error
from ai_handler_dagster.replicate.waiting import ListSweep, wait_many
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from ai_handler_dagster.storage.objects import AttemptFiles
from ai_handler_dagster.webhooks.config import public_webhook_url
from ai_handler_dagster.webhooks.lookup import make_batched_lookup

#: Transient infrastructure errors (database, S3) retry the op with exponential backoff and
#: jitter; per-generation provider errors never reach this, they fail only their generation.
TRANSIENT_RETRY = RetryPolicy(
    max_retries=3, delay=1.0, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)

F = TypeVar("F", bound=Callable[..., Any])


def ends_when_terminated(fn: F) -> F:
    """Fail the step for good when its run is terminated, instead of retrying it.

    Dagster turns an interrupt raised inside an op that has a retry policy into a retry of the
    step (dagster-io/dagster#15026). With the in-process executor the termination request is the
    only interrupt a run gets, so the step simply started again and the run went on to the end as
    if nobody had canceled it: the prediction ran on, was paid for and charged. A ``Failure``
    that allows no retry fails the step instead: the failure hook cancels the batch's predictions
    and refunds it, and Dagster ends the run ``CANCELED`` (it is ``CANCELING`` by then).
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
            raise Failure(
                description="The run was terminated while this step ran; it is not retried.",
                allow_retries=False,
            ) from exc

    return cast(F, wrapper)


#: Tries per output download when the file host answers with a transient error, and the
#: first backoff (``retries.py``'s policy doubles it per try).
DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_BACKOFF_S = 0.5

#: Upper bound on threads one op uses for a batch (I/O bound work: HTTP calls and small
#: transactions).
MAX_WORKERS = 16

T = TypeVar("T")
R = TypeVar("R")


class BatchConfig(Config):
    """Which generations this run processes. The sensor fills it in; an operator can too."""

    generation_ids: list[int] = Field(
        description="Ids of the generations (status queued or pending) this run processes."
    )


@dataclass(frozen=True)
class Held:
    """A generation attempt this run holds credits for. Every later step acts on this attempt
    only: a generation requeued meanwhile (a new attempt) is refused by its transitions."""

    generation_id: int
    attempt: int


@dataclass(frozen=True)
class AwaitedPrediction:
    """A generation whose prediction succeeded, with what the next steps need."""

    generation_id: int
    attempt: int
    prediction_id: str
    output: Any
    predict_time: float | None
    web_url: str | None = None
    #: The prediction's ``metrics`` (token counts for a per-token price). Defaulted, so that an
    #: AwaitedPrediction pickled before the field existed still loads (and charges the hold).
    metrics: dict[str, Any] | None = None


@dataclass
class BatchReport:
    """Per-op tally that becomes the op's metadata in the UI."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    def markdown(self) -> str:
        if not self.rows:
            return "_none_"
        columns = list(self.rows[0])
        lines = [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
        return "\n".join(lines)


def _in_parallel(
    items: Sequence[T], fn: Callable[[T], R], *, stop: threading.Event | None = None
) -> list[R]:
    """Run ``fn`` over items on a small thread pool, results in input order.

    Exceptions propagate (after all items ran) so an infrastructure failure still fails the op.
    ``stop`` is set when this thread is interrupted (the run terminated), before waiting for
    the others: work that waits long (a turn at the create throttle) watches it and ends.
    """
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(items))) as pool:
        try:
            return list(pool.map(fn, items))
        except BaseException:
            if stop is not None:
                stop.set()
            raise


def _by_id(codes: dict[int, Any]) -> dict[str, Any]:
    """Generation id -> error code, with string keys as JSON metadata needs."""
    return {str(gid): code for gid, code in codes.items()}


def _fail(
    engine: sa.Engine, generation_id: int, error: GenerationError, *, attempt: int | None = None
) -> bool:
    """Fail one generation and release its hold, in one transaction. True if this call did it;
    False if it had ended already or (with ``attempt``) moved on to another attempt."""
    with session_scope(engine) as session:
        try:
            return gens.fail(
                session, generation_id, code=error.code, message=error.message, attempt=attempt
            )
        except gens.InvalidTransition:
            return False


def _first_creates(engine: sa.Engine, attempts: Mapping[int, int]) -> dict[int, float]:
    """Epoch seconds of each attempt's first create (generation id -> time)."""
    if not attempts:
        return {}
    with session_scope(engine) as session:
        rows = session.execute(
            sa.select(
                CreateAttempt.generation_id, CreateAttempt.attempt, CreateAttempt.started_at
            ).where(CreateAttempt.generation_id.in_(list(attempts)))
        ).all()
    return {gid: started.timestamp() for gid, a, started in rows if attempts.get(gid) == a}


def _load(engine: sa.Engine, ids: Iterable[int]) -> dict[int, Generation]:
    ids = list(ids)
    if not ids:
        return {}
    with session_scope(engine) as session:
        rows = session.scalars(sa.select(Generation).where(Generation.id.in_(ids))).all()
        session.expunge_all()
    return {row.id: row for row in rows}


@op(
    retry_policy=TRANSIENT_RETRY,
    out=Out(list[Held], description="Generation attempts now holding credits."),
)
@ends_when_terminated
def reserve_credits(
    context: OpExecutionContext,
    config: BatchConfig,
    database: DatabaseResource,
    pricing: PricingResource,
) -> list[Held]:
    """Hold each generation's price (the maximum, for metered models) on its user's account.

    A user who cannot afford it gets that generation failed with ``insufficient_credits`` and no
    charge; the others go on.
    """
    engine = database.engine()
    prices = pricing.book()
    instance = context.instance
    hold_ttl = lifetimes.hold_lifetime(
        instance.run_monitoring_max_runtime_seconds if instance.run_monitoring_enabled else None
    )
    held: list[Held] = []
    report = BatchReport()
    for generation_id in config.generation_ids:
        try:
            with session_scope(engine) as session:
                row = gens.start_attempt(
                    session, generation_id, run_id=context.run_id, prices=prices, hold_ttl=hold_ttl
                )
                status, user, model, amount = row.status, row.user_id, row.model, row.amount_held
                code, attempt = row.error_code, row.attempt
        except sa.exc.SQLAlchemyError:
            raise  # the database itself: the op's retry policy takes over
        except Exception as exc:
            # Whatever a row holds, it fails alone: a neighbour's batch must not fail with it.
            error = GenerationError(INTERNAL_ERROR, f"could not start this generation: {exc!r}")
            _fail(engine, generation_id, error)
            status, user, model, amount = GenerationStatus.FAILED, None, None, 0
            code, attempt = error.code, 0
        report.rows.append(
            {
                "generation": generation_id,
                "user": user,
                "model": model,
                "held": amount,
                "status": status,
            }
        )
        if status == GenerationStatus.RUNNING:
            held.append(Held(generation_id, attempt))
        else:
            report.failed[generation_id] = code or status
            context.log.warning(f"generation {generation_id} not started: {code or status}")
    context.add_output_metadata(
        {
            "generation_ids": MetadataValue.json(list(config.generation_ids)),
            "held": len(held),
            "refused": MetadataValue.json(_by_id(report.failed)),
            "credits_held": sum(
                r["held"] or 0 for r in report.rows if r["status"] == GenerationStatus.RUNNING
            ),
            "generations": MetadataValue.md(report.markdown()),
        }
    )
    return held


@op(
    retry_policy=TRANSIENT_RETRY,
    pool="replicate",
    ins={"held": In(list[Held])},
    out=Out(list[Held], description="Generation attempts with a prediction on Replicate."),
)
@ends_when_terminated
def create_predictions(
    context: OpExecutionContext,
    held: list[Held],
    database: DatabaseResource,
    replicate: ReplicateResource,
    pricing: PricingResource,
) -> list[Held]:
    """Start (or find again) one Replicate prediction per generation, each with the
    ``Cancel-After`` of its model's price (``lifetimes.py``).

    A generation that already has a prediction (op retry, resumed run) keeps it; one that is no
    longer running (it failed in an earlier try of this op) is left alone. One whose earlier
    try may have created a prediction without recording it adopts that prediction instead of
    paying for a second one (see ``adoption.py``). If any answer was lost, the step ends by
    canceling orphans: predictions one of our attempts made that no attempt owns.

    Every create waits for its turn at the deployment's one create throttle (``throttle.py``),
    keeping its hold, for as long as its queue deadline allows (``lifetimes.queue_deadline``);
    past it the generation fails with ``deadline_exceeded`` and is refunded.
    """
    engine = database.engine()
    prices = pricing.book()
    attempts = {h.generation_id: h.attempt for h in held}
    rows = _load(engine, attempts)
    # With webhooks configured, Replicate reports the end of each prediction by webhook and
    # the await step mostly reads the database instead of polling the API.
    webhook = public_webhook_url()
    step_started = utcnow()
    lost: list[int] = []
    # One pace of creates for every run and process (the app database's token bucket).
    creates = throttle.CreateThrottle(engine)
    stop = threading.Event()

    def start(generation_id: int) -> tuple[int, str | None, str | None]:
        row = rows[generation_id]
        if row.attempt != attempts[generation_id]:
            return generation_id, None, "requeued"  # a newer attempt is not this run's
        if row.prediction_id:
            return generation_id, row.prediction_id, None
        if row.status != GenerationStatus.RUNNING:
            return generation_id, None, row.error_code or row.status
        attempt = adoption.Attempt(generation_id, row.attempt, row.model, row.input)
        try:
            snapshot, was_lost = adoption.obtain(
                engine,
                replicate.get_client(),
                attempt,
                webhook=webhook,
                cancel_after_s=lifetimes.cancel_after_s(prices.find(row.model)),
                log=context.log.warning,
                # It waits its turn, up to its queue deadline, keeping its hold.
                pacer=creates.pacer(lifetimes.queue_deadline(row.queued_at).timestamp(), stop=stop),
            )
        except GenerationError as error:
            _fail(engine, generation_id, error, attempt=row.attempt)
            return generation_id, None, error.code
        except gens.InvalidTransition as exc:
            # The generation ended meanwhile (canceled, or refunded by another path): nothing
            # to create. A create of it already sent may have lost its answer: sweep orphans.
            context.log.warning(f"generation {generation_id}: {exc}")
            lost.append(generation_id)
            return generation_id, None, "ended"
        if was_lost:
            lost.append(generation_id)
        return generation_id, snapshot.id, None

    results = _in_parallel(list(rows), start, stop=stop)
    if lost:
        with contextlib.suppress(GenerationError):  # reconciliation sweeps again later
            adoption.cancel_orphans(
                engine, replicate.get_client(), since=step_started, log=context.log.warning
            )
    created = [Held(gid, attempts[gid]) for gid, pid, _ in results if pid]
    failed = {gid: code for gid, pid, code in results if not pid}
    context.add_output_metadata(
        {
            "predictions": MetadataValue.md(
                BatchReport(
                    rows=[
                        {"generation": gid, "prediction": pid or "", "error": code or ""}
                        for gid, pid, code in results
                    ]
                ).markdown()
            ),
            "created": len(created),
            "failed": MetadataValue.json(_by_id(failed)),
        }
    )
    return created


@op(
    retry_policy=TRANSIENT_RETRY,
    ins={"held": In(list[Held])},
    out=Out(list[AwaitedPrediction], description="Succeeded predictions with their outputs."),
)
@ends_when_terminated
def await_predictions(
    context: OpExecutionContext,
    held: list[Held],
    database: DatabaseResource,
    replicate: ReplicateResource,
    pricing: PricingResource,
) -> list[AwaitedPrediction]:
    """Wait for every prediction of the batch, failing and refunding each one as soon as it fails.

    When webhooks are configured the state they recorded is read from the database first and the
    API is only polled slowly as a fallback. Without them, a sweep of the provider's list of recent
    predictions answers for a page of predictions per request; GETs (backing off per prediction)
    cover only what the list did not show.

    Each prediction's deadline counts from its attempt's first create (``lifetimes.py``), so a
    retry of this step does not give it more time.
    """
    engine = database.engine()
    prices = pricing.book()
    attempts = {h.generation_id: h.attempt for h in held}
    rows = _load(engine, attempts)
    by_prediction = {
        row.prediction_id: gid
        for gid, row in rows.items()
        if row.prediction_id and row.attempt == attempts[gid]
    }
    succeeded: list[AwaitedPrediction] = []
    failed: dict[int, str] = {}
    total = len(by_prediction)
    webhooks = public_webhook_url() is not None
    ids = list(by_prediction)
    lookup = make_batched_lookup(engine, ids) if webhooks else None
    client = replicate.get_client()
    # Without webhooks, listing recent predictions answers for a page of them per request.
    sweep = None if webhooks else ListSweep(client, ids)
    first_creates = _first_creates(engine, attempts)
    deadlines = {
        pid: first_creates.get(gid, time.time())
        + lifetimes.prediction_deadline_s(prices.find(rows[gid].model))
        for pid, gid in by_prediction.items()
    }
    waiting = wait_many(
        client, ids, lookup=lookup, expect_webhooks=webhooks, sweep=sweep, deadlines=deadlines
    )
    for done, snapshot in enumerate(waiting, start=1):
        generation_id = by_prediction[snapshot.id]
        price = prices.find(rows[generation_id].model)
        if (
            snapshot.unreadable is None
            and snapshot.ended_at_provider
            and price is not None
            and price.provider is not None
        ):
            # What the provider bills for this prediction is known now, whatever happens to
            # its outputs next (failed and canceled predictions are billed too). One we canceled
            # at its deadline may still be canceling: reconciliation prices it once it ends.
            with session_scope(engine) as session:
                gens.record_provider_cost(
                    session,
                    generation_id,
                    attempt=attempts[generation_id],
                    prediction_id=snapshot.id,
                    prices=prices,
                    status=snapshot.status,
                    output=snapshot.output,
                    metrics=snapshot.metrics,
                    never_started=snapshot.never_started,
                )
        error = snapshot_error(snapshot)
        if error is None and snapshot.status == PredictionStatus.SUCCEEDED:
            succeeded.append(
                AwaitedPrediction(
                    generation_id=generation_id,
                    attempt=attempts[generation_id],
                    prediction_id=snapshot.id,
                    output=snapshot.output,
                    predict_time=snapshot.predict_time,
                    web_url=snapshot.web_url,
                    metrics=dict(snapshot.metrics),
                )
            )
        else:
            error = error or GenerationError(
                INTERNAL_ERROR, f"prediction {snapshot.id} ended as {snapshot.status}"
            )
            failed[generation_id] = error.code
            if _fail(engine, generation_id, error, attempt=attempts[generation_id]):
                context.log.warning(
                    f"generation {generation_id} failed: {error.code}: {error.message}"
                )
            else:  # it had ended first (canceled by its application, refunded elsewhere)
                context.log.info(
                    f"generation {generation_id} had ended; its prediction {snapshot.id} "
                    f"is {snapshot.status}"
                )
            if snapshot.unreadable is not None:
                # It may still be running at the provider: stop paying for it if we can.
                with contextlib.suppress(GenerationError):
                    client.cancel(snapshot.id)
        if done == total or done % 10 == 0:
            context.log.info(f"{done}/{total} predictions finished ({len(failed)} failed)")
    metadata: dict[str, Any] = {
        "succeeded": len(succeeded),
        "failed": MetadataValue.json(_by_id(failed)),
        "predictions": MetadataValue.md(
            BatchReport(
                rows=[
                    {
                        "generation": a.generation_id,
                        "prediction": f"[{a.prediction_id}]({a.web_url})"
                        if a.web_url
                        else a.prediction_id,
                        "predict_time_s": a.predict_time,
                    }
                    for a in succeeded
                ]
            ).markdown()
        ),
    }
    if len(succeeded) == 1 and succeeded[0].web_url:
        metadata["prediction_url"] = MetadataValue.url(succeeded[0].web_url)
    context.add_output_metadata(metadata)
    return succeeded


@op(
    retry_policy=TRANSIENT_RETRY,
    ins={"awaited": In(list[AwaitedPrediction])},
    out=Out(io_manager_key="outputs_io_manager", description="Output files, stored in S3."),
)
@ends_when_terminated
def store_outputs(
    context: OpExecutionContext,
    awaited: list[AwaitedPrediction],
    database: DatabaseResource,
    output_policy: OutputPolicyResource,
) -> dict[int, AttemptFiles]:
    """Download each prediction's outputs safely into temporary files; the IO manager uploads
    them to S3 under the attempt's deterministic keys. A refused or expired output fails its
    generation only."""
    engine = database.engine()
    policy = output_policy.policy()
    # A generation that ended since its prediction succeeded (canceled by its application,
    # refunded by another path) gets nothing stored: finalize would only delete it again.
    rows = _load(engine, [a.generation_id for a in awaited])
    ended = {
        a.generation_id
        for a in awaited
        if a.generation_id in rows
        and (
            rows[a.generation_id].attempt != a.attempt
            or rows[a.generation_id].status != GenerationStatus.RUNNING
        )
    }
    for generation_id in sorted(ended):
        context.log.warning(f"generation {generation_id} ended before its outputs were stored")
    staging = tempfile.mkdtemp(prefix="ai-handler-outputs-")

    def stage(item: AwaitedPrediction) -> tuple[int, AttemptFiles | None]:
        if item.generation_id in ended:
            return item.generation_id, None
        try:
            # A passing network error or 5xx from the file host: try again shortly.
            files = retries.retrying(attempts=DOWNLOAD_ATTEMPTS, base_s=DOWNLOAD_BACKOFF_S)(
                output_policy.stage, item.output, policy, staging
            )
        except GenerationError as error:
            _fail(engine, item.generation_id, error, attempt=item.attempt)
            context.log.warning(
                f"generation {item.generation_id} output not stored: {error.code}: {error.message}"
            )
            return item.generation_id, None
        return item.generation_id, AttemptFiles(item.attempt, files)

    try:
        results = _in_parallel(awaited, stage)
    except BaseException:
        # Nothing reaches the IO manager, which would delete the staged files: do it here.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {gid: files for gid, files in results if files is not None}


@op(
    retry_policy=TRANSIENT_RETRY,
    ins={
        "stored": In(dict[int, list[Any]], input_manager_key="outputs_io_manager"),
        "awaited": In(list[AwaitedPrediction]),
    },
    out=Out(list[int], description="Generations that succeeded."),
)
@ends_when_terminated
def finalize(
    context: OpExecutionContext,
    stored: dict[int, list[Any]],
    awaited: list[AwaitedPrediction],
    database: DatabaseResource,
    pricing: PricingResource,
    # The IO manager that stored the objects, used here to delete those of a failed attempt.
    outputs_io_manager: ResourceParam[GenerationOutputsIOManager],
) -> list[int]:
    """Capture each generation's charge (the rest of a metered hold returns to the user) and mark
    it succeeded with its S3 objects, in one transaction per generation. The objects of an
    attempt that does not succeed here are deleted: nothing undelivered stays readable."""
    engine = database.engine()
    prices = pricing.book()
    by_generation = {a.generation_id: a for a in awaited}
    done: list[int] = []
    charged = 0
    rows: list[dict[str, Any]] = []
    for generation_id, objects in sorted(stored.items()):
        item = by_generation[generation_id]
        try:
            with session_scope(engine) as session:
                row = gens.succeed(
                    session,
                    generation_id,
                    outputs=[obj.to_json() for obj in objects],
                    predict_time=item.predict_time,
                    metrics=item.metrics,
                    prices=prices,
                    attempt=item.attempt,
                    prediction_id=item.prediction_id,
                )
                status, amount = row.status, row.amount_charged
        except gens.EmptyOutput as exc:
            # Nothing delivered, nothing charged: the generation fails and is refunded.
            error = GenerationError(EMPTY_OUTPUT, str(exc))
            _fail(engine, generation_id, error, attempt=item.attempt)
            context.log.warning(f"generation {generation_id} failed: {exc}")
            status, amount = GenerationStatus.FAILED, 0
        except gens.AttemptMismatch as exc:
            # Requeued meanwhile: the newer attempt is not this run's to settle or clean up.
            context.log.warning(f"generation {generation_id} not finalized: {exc}")
            status, amount = "requeued", 0
        except gens.InvalidTransition as exc:
            # Another path ended this attempt first (refunded it): leave the money as it is.
            context.log.warning(f"generation {generation_id} not finalized: {exc}")
            status, amount = "ended elsewhere", 0
        except ledger.HoldAlreadyEnded as exc:
            # Another path refunded this generation first (e.g. its hold expired): it stays
            # refunded and is marked failed; nothing is charged.
            error = GenerationError(INTERNAL_ERROR, f"hold ended: {exc}")
            _fail(engine, generation_id, error, attempt=item.attempt)
            status, amount = GenerationStatus.FAILED, 0
        if status in (GenerationStatus.FAILED, "ended elsewhere") and objects:
            outputs_io_manager.store().delete_attempt(generation_id, item.attempt)
        if status == GenerationStatus.SUCCEEDED:
            done.append(generation_id)
            charged += amount or 0
        rows.append(
            {
                "generation": generation_id,
                "status": status,
                "charged": amount,
                "objects": ", ".join(obj.uri for obj in objects),
            }
        )
    context.add_output_metadata(
        {
            "succeeded": len(done),
            "credits_charged": charged,
            **_cost_metadata(engine, by_generation, rows),
            "generations": MetadataValue.md(BatchReport(rows=rows).markdown()),
        }
    )
    return done


def _cost_metadata(
    engine: sa.Engine, awaited: Mapping[int, AwaitedPrediction], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The provider's cost and our margin per finalized generation (added to ``rows``) and in
    total: margin = credits charged x ``settings.credit_value_usd()`` - provider cost.

    The table's USD are rounded to 6 decimals and the totals are floats (the UI plots them);
    the exact figures are in the database and in ``ai-handler usage --json``.
    """
    credit_value = settings.credit_value_usd()
    with session_scope(engine) as session:
        found = session.execute(
            sa.select(
                CreateAttempt.generation_id, CreateAttempt.attempt, CreateAttempt.provider_cost_nusd
            ).where(CreateAttempt.generation_id.in_(list(awaited)))
        ).all()
    costs = {gid: cost for gid, a, cost in found if awaited[gid].attempt == a}
    total_cost, total_margin, unknown = 0, Decimal(0), 0
    for row in rows:
        cost = costs.get(row["generation"])
        charged = row["charged"] or 0
        margin = margin_usd(charged, credit_value, cost)
        row["provider_usd"], row["margin_usd"] = format_usd(cost, nano=True), format_usd(margin)
        if cost is None or margin is None:
            unknown += 1
            continue
        total_cost += cost
        total_margin += margin
    return {
        "provider_cost_usd": MetadataValue.float(float(nano_to_usd(total_cost))),
        "margin_usd": MetadataValue.float(float(total_margin)),
        "credit_value_usd": MetadataValue.text(str(credit_value)),
        "provider_cost_unknown": unknown,
    }


# --- the job ------------------------------------------------------------------------------------

#: The job's name: the request sensor targets it by name.
GENERATION_JOB = "generation_job"


def batch_run_config(generation_ids: Sequence[int]) -> RunConfig:
    """The run config of a run over these generations (what the request sensor launches)."""
    return RunConfig(ops={"reserve_credits": BatchConfig(generation_ids=sorted(generation_ids))})


def build_generation_job(executor_def: ExecutorDefinition = in_process_executor) -> JobDefinition:
    """The generation job. The design runs its ops in the run's own process, one after another
    (``in_process_executor``); another executor serves only to measure the naive design (Dagster's
    default, a process per op: ``proving/naive.py``)."""

    @job(
        name=GENERATION_JOB,
        executor_def=executor_def,
        hooks={refund_on_failure},
        tags={RunTag.KIND: "generation"},
        description=(
            "Charge, generate, store and settle a batch of generations: hold credits, run the "
            "model on Replicate, store the outputs in S3, capture the charge. Failures refund."
        ),
    )
    def generation_job() -> None:
        held = reserve_credits()
        created = create_predictions(held)
        awaited = await_predictions(created)
        finalize(store_outputs(awaited), awaited)

    return generation_job


#: The job as the project runs it (in-process executor).
generation_job = build_generation_job()
