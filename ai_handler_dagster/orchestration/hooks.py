"""The fast refund path: when an op of a generation run fails for good, release the holds of the
run's unfinished generations at once, before the run itself is marked failed."""

from dagster import DagsterRunStatus, HookContext, failure_hook

from ai_handler_dagster.errors import RUN_FAILED
from ai_handler_dagster.orchestration.recovery import BATCH_TAG, refund_unfinished


@failure_hook(required_resource_keys={"database", "replicate"})
def refund_on_failure(context: HookContext) -> None:
    """Fail and refund the unfinished generations of this run (idempotent)."""
    run = context.instance.get_run_by_id(context.run_id)
    batch_key = run.tags.get(BATCH_TAG) if run else None
    error = context.op_exception
    reason = f"{type(error).__name__}: {error}" if error else "op failed"
    # A step that failed because an operator terminated the run ends its generations canceled.
    terminated = run is not None and run.status in (
        DagsterRunStatus.CANCELING,
        DagsterRunStatus.CANCELED,
    )
    refunded = refund_unfinished(
        context.resources.database.engine(),
        run_id=context.run_id,
        batch_key=batch_key,
        code=RUN_FAILED,
        message=f"step {context.step_key} failed: {reason}"[:1000],
        status="canceled" if terminated else "failed",
        cancel_prediction=context.resources.replicate.get_client().cancel,
    )
    if refunded:
        context.log.warning(f"refunded generations {refunded} after step {context.step_key} failed")
