"""Fixtures of the end-to-end tests: a temporary state folder per stack, PostgreSQL databases for
the stacks that ask for them, and the stack's log tails attached to every failing test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ai_handler_dagster.devstack.stack import Stack
from tests.conftest import drop_pg_database, new_pg_database

from .support import App, log_tails


@dataclass
class StackUnderTest:
    """A running stack and the app database it serves."""

    stack: Stack
    app: App


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


@dataclass
class PgDatabases:
    """Two fresh PostgreSQL databases: Dagster's storage and the app's."""

    dagster_url: str
    app_url: str


@contextlib.contextmanager
def pg_databases(pg_available: bool) -> Iterator[PgDatabases]:
    """Create the two databases (skip without PostgreSQL), drop them afterwards."""
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable (set AI_HANDLER_TEST_PG_URL)")
    dagster_url = new_pg_database("aih_e2e_dagster")
    app_url = new_pg_database("aih_e2e_app")
    try:
        yield PgDatabases(dagster_url=dagster_url, app_url=app_url)
    finally:
        drop_pg_database(dagster_url)
        drop_pg_database(app_url)
