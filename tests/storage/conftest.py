"""Fixtures for storage tests: a client for the local S3 endpoint and a local file server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ai_handler_dagster.devstack.s3 import LocalS3
from tests.support.fileserver import FileServer


@pytest.fixture
def s3_client(local_s3: LocalS3) -> Any:
    """A boto3 client for the local endpoint."""
    return local_s3.client()


@pytest.fixture(scope="session")
def _file_server_session() -> Iterator[FileServer]:
    server = FileServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def file_server(_file_server_session: FileServer) -> FileServer:
    """The session's HTTP file server, with no routes and an empty request log."""
    _file_server_session.reset()
    return _file_server_session
