"""The Dagster definitions of the project: ``defs`` is what ``workspace.yaml`` loads.

Resources follow the one environment switch (``AI_HANDLER_ENV``): the embedded setup points them at
the local emulator and S3 endpoint that ``ai-handler dev`` starts; production at Replicate and S3.
Secrets (the Replicate token, AWS keys) are read only through ``EnvVar`` or the AWS credential
chain at run time, so they never appear in run config, logs or metadata.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dagster import (
    Definitions,
    EnvVar,
    ExecutorDefinition,
    in_process_executor,
    multiprocess_executor,
)
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from ai_handler_dagster import lifetimes, settings
from ai_handler_dagster.orchestration.generation import build_generation_job, generation_job
from ai_handler_dagster.orchestration.recovery import (
    reconcile_job,
    reconcile_schedule,
    refund_sensors,
)
from ai_handler_dagster.orchestration.reprocess import reprocess_day_job, reprocess_generations_job
from ai_handler_dagster.orchestration.request_sensor import generation_request_sensor
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager


def _optional_env(name: str) -> EnvVar | None:
    """``EnvVar(name)`` when the variable is set (read again at run time), else None."""
    return EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict[str, object]:
    """Resources for the current environment (``AI_HANDLER_ENV``)."""
    embedded = settings.environment() is settings.Environment.EMBEDDED
    base_url = _optional_env("REPLICATE_BASE_URL")
    s3 = S3Resource(
        endpoint_url=_optional_env("AI_HANDLER_S3_ENDPOINT_URL"),
        region_name=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
    )
    bucket = settings.s3_bucket()
    replicate_kwargs: dict[str, Any] = {
        # Production needs the token to load; embedded (plain ``dagster dev`` without the stack)
        # loads without it, and only a call to the provider then fails, as unauthorized.
        "api_token": _optional_env("REPLICATE_API_TOKEN")
        if embedded
        else EnvVar("REPLICATE_API_TOKEN"),
        "deadline_s": settings.prediction_deadline_s(),
        # The provider cancels by itself a little after our own deadline, should we be gone
        # (creates send their model's own value, see lifetimes.py).
        "cancel_after_s": lifetimes.cancel_after_s(None),
    }
    if base_url is not None:
        replicate_kwargs["base_url"] = base_url
    return {
        "database": DatabaseResource(),
        "pricing": PricingResource(),
        "replicate": ReplicateResource(**replicate_kwargs),
        "output_policy": OutputPolicyResource(emulator_base_url=base_url if embedded else None),
        "s3": s3,
        "outputs_io_manager": GenerationOutputsIOManager(s3=s3, bucket=bucket),
        # Small intermediate values (lists of ids) between ops, in the same bucket: nothing
        # assumes that the ops of a run share a disk.
        "io_manager": S3PickleIOManager(s3_resource=s3, s3_bucket=bucket, s3_prefix="dagster-io"),
    }


def build_definitions(executor_def: ExecutorDefinition = in_process_executor) -> Definitions:
    """The code location. ``executor_def`` runs the generation job's ops (default: in the run's
    own process); another one serves only to measure the naive design."""
    job = (
        generation_job
        if executor_def is in_process_executor
        else build_generation_job(executor_def)
    )
    return Definitions(
        jobs=[job, reprocess_day_job, reprocess_generations_job, reconcile_job],
        sensors=[generation_request_sensor, *refund_sensors(job)],
        schedules=[reconcile_schedule],
        resources=build_resources(),
    )


def _executor_from_settings() -> ExecutorDefinition:
    # Read when the code location loads, not where the job is defined.
    if settings.executor() == "in_process":
        return in_process_executor
    logging.getLogger(__name__).warning(
        "AI_HANDLER_EXECUTOR=multiprocess is deprecated and will be removed: the naive design "
        "it measured is its own code location now (ai_handler_dagster.proving.naive, loaded "
        "by `ai-handler bench --naive`)"
    )
    return multiprocess_executor


defs = build_definitions(_executor_from_settings())
