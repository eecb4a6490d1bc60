"""Hooks of the end-to-end tests: the stack's log tails attached to every failing test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ai_handler_dagster.devstack.stack import Stack
from tests.support.stack import StackUnderTest, log_tails


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the tails of the stack's logs (daemon, emulator, S3) to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        stack = value.stack if isinstance(value, StackUnderTest) else value
        if isinstance(stack, Stack):
            report.sections.append(("stack logs", log_tails(stack)))
