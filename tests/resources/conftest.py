"""Fixtures for resource tests: the Replicate emulator of the client's tests."""

from tests.replicate.conftest import emulator  # noqa: F401 - a fixture, found by its name
