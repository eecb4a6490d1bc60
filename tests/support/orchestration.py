"""The generation job in process: its resources on local parts, rows submitted, credits granted."""

from __future__ import annotations

from typing import Any

from dagster import DagsterInstance
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.devstack.emulator import EmulatorHandle
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager


def job_resources(
    db_url: str, emulator: EmulatorHandle, s3: LocalS3, bucket: str
) -> dict[str, Any]:
    """The job's resources: the emulator, and ``bucket`` on the local S3 endpoint ``s3``."""
    s3_resource = S3Resource(endpoint_url=s3.endpoint_url, region_name="us-east-1")
    return {
        "database": DatabaseResource(url=db_url),
        "pricing": PricingResource(),
        "replicate": ReplicateResource(
            api_token=emulator.token, base_url=emulator.base_url, poll_initial_s=0.1
        ),
        "output_policy": OutputPolicyResource(emulator_base_url=emulator.base_url),
        "s3": s3_resource,
        "outputs_io_manager": GenerationOutputsIOManager(s3=s3_resource, bucket=bucket),
        "io_manager": S3PickleIOManager(
            s3_resource=s3_resource, s3_bucket=bucket, s3_prefix="dagster-io"
        ),
    }


def run_pending(
    db_url: str, emulator: EmulatorHandle, s3: LocalS3, bucket: str, instance: DagsterInstance
) -> None:
    """Claim every pending generation into one batch, as the sensor would, and run it."""
    from ai_handler_dagster.orchestration.generation import batch_run_config, generation_job
    from ai_handler_dagster.orchestration.request_sensor import batch_key_for

    with session_scope(make_engine(db_url)) as session:
        ids = [r.id for r in gens.claim_pending(session, limit=100, batch_key_fn=batch_key_for)]
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(db_url, emulator, s3, bucket),
        instance=instance,
    )
    assert result.success


def submit(db_url: str, user: str, requests: list[tuple[str, dict[str, Any]]]) -> list[int]:
    prices = load_pricing()
    with session_scope(make_engine(db_url)) as session:
        return [
            gens.submit(session, user_id=user, model=model, input=payload, prices=prices).id
            for model, payload in requests
        ]


def grant(db_url: str, user: str, amount: int) -> None:
    with session_scope(make_engine(db_url)) as session:
        ledger.grant(session, user, amount, key=f"test-grant:{user}:{amount}")
