"""Fixtures for storage tests: a local S3 endpoint (moto, over HTTP) and a local file server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ai_handler_dagster.devstack.s3 import LocalS3, start_local_s3
from tests.support.fileserver import FileServer


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    """One in-process moto S3 server on a free port for the whole session."""
    s3 = start_local_s3(port=0, bucket="storage-tests")
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def s3_client(local_s3: LocalS3) -> Any:
    """A boto3 client for the local endpoint."""
    return local_s3.client()


@pytest.fixture
def bucket(local_s3: LocalS3, s3_client: Any) -> str:
    """A fresh, empty bucket per test, so exact key listings are meaningful."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    return name


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
