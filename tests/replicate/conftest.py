"""Fixtures for the Replicate client tests: a real Replicate emulator on a free local port, per
test.

Each test gets its own emulator, so its ``stats()`` and ``predictions()`` count only what that
test did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ai_handler_dagster.devstack.emulator import EmulatorConfig, start_emulator
from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings


@pytest.fixture
def emulator() -> Iterator[Any]:
    """A running emulator (fast models, no faults); stopped after the test."""
    handle = start_emulator(EmulatorConfig(latency_s=0.2, concurrency=8), host="127.0.0.1", port=0)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def make_client(emulator: Any) -> Callable[..., ReplicateClient]:
    """Build a ReplicateClient pointed at the emulator, with test-speed timings."""

    def build(**overrides: Any) -> ReplicateClient:
        settings: dict[str, Any] = {
            "api_token": emulator.token,
            "base_url": emulator.base_url,
            "timeout_s": 5.0,
            "retry_backoff_s": 0.05,
            "poll_initial_s": 0.05,
            "poll_max_s": 0.3,
        }
        settings.update(overrides)
        return ReplicateClient(ReplicateSettings(**settings))

    return build
