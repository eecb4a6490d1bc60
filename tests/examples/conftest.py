"""Hooks of the example tests: as in the end-to-end tests, a failing test gets the tails of the
stack's logs (API, daemon, emulator, S3) attached to its report."""

from tests.e2e.conftest import pytest_runtest_makereport

__all__ = ["pytest_runtest_makereport"]
