"""Fixtures for running the generation job in process against real local parts: the Replicate
emulator and a migrated app database (the S3 endpoint and its buckets: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dagster import DagsterInstance, instance_for_test

from ai_handler_dagster.db import upgrade
from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator


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
