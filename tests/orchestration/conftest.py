"""Fixtures for running the generation job in process against real local parts: the Replicate
emulator and a moto S3 server over HTTP, and a migrated app database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, instance_for_test
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator
from ai_handler_dagster.devstack.s3 import LocalS3, start_local_s3
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    with start_local_s3() as s3:
        yield s3


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    handle = start_emulator(EmulatorConfig(latency_s=0.2, concurrency=8), port=0)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def app_db(any_db_url: str) -> str:
    upgrade(any_db_url)
    return any_db_url


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:
        yield inst


def job_resources(db_url: str, emulator: EmulatorHandle, s3: LocalS3) -> dict[str, Any]:
    s3_resource = S3Resource(endpoint_url=s3.endpoint_url, region_name="us-east-1")
    return {
        "database": DatabaseResource(url=db_url),
        "pricing": PricingResource(),
        "replicate": ReplicateResource(
            api_token=emulator.token, base_url=emulator.base_url, poll_initial_s=0.1
        ),
        "output_policy": OutputPolicyResource(emulator_base_url=emulator.base_url),
        "s3": s3_resource,
        "outputs_io_manager": GenerationOutputsIOManager(s3=s3_resource, bucket=s3.bucket),
        "io_manager": S3PickleIOManager(
            s3_resource=s3_resource, s3_bucket=s3.bucket, s3_prefix="dagster-io"
        ),
    }


def run_pending(
    db_url: str, emulator: EmulatorHandle, s3: LocalS3, instance: DagsterInstance
) -> None:
    """Claim every pending generation into one batch, as the sensor would, and run it."""
    from ai_handler_dagster.orchestration.generation import batch_run_config, generation_job
    from ai_handler_dagster.orchestration.request_sensor import batch_key_for

    with session_scope(make_engine(db_url)) as session:
        ids = [r.id for r in gens.claim_pending(session, limit=100, batch_key_fn=batch_key_for)]
    result = generation_job.execute_in_process(
        run_config=batch_run_config(ids),
        resources=job_resources(db_url, emulator, s3),
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
