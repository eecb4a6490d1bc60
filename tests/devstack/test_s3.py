"""The local S3 endpoint works over HTTP, in-process and as its own process.

Proves that ``start_local_s3`` serves S3 on a free port with the bucket already created and frees
the port on stop, and that ``python -m ai_handler_dagster.devstack.s3 --port-file`` writes the
bound port only once the endpoint answers, serves other processes over HTTP, and exits cleanly
(removing the port file) on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ai_handler_dagster.devstack.s3 import local_s3_client, start_local_s3
from ai_handler_dagster.settings import DEFAULT_BUCKET


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_in_process_endpoint_serves_its_bucket_and_stops() -> None:
    s3 = start_local_s3()  # defaults: 127.0.0.1, a free port, the default bucket
    try:
        assert s3.endpoint_url == f"http://127.0.0.1:{s3.port}"
        assert s3.port > 0 and s3.bucket == DEFAULT_BUCKET == "ai-handler-outputs"
        client = s3.client()
        client.head_bucket(Bucket=DEFAULT_BUCKET)  # created on start
        client.put_object(Bucket=s3.bucket, Key="k.txt", Body=b"hello", ContentType="text/plain")
        assert client.get_object(Bucket=s3.bucket, Key="k.txt")["Body"].read() == b"hello"
    finally:
        s3.stop()
    assert not _port_open(s3.port)


def test_process_entry_point_writes_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "state" / "s3.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai_handler_dagster.devstack.s3",
            "--port",
            "0",
            "--bucket",
            "devstack-proc",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _out, err = proc.communicate(timeout=5)
                pytest.fail(f"endpoint did not start: {proc.returncode} {err.decode()[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text())
        client = local_s3_client(f"http://127.0.0.1:{port}")
        # The bucket exists as soon as the port is published.
        client.head_bucket(Bucket="devstack-proc")
        client.put_object(Bucket="devstack-proc", Key="x", Body=b"from another process")
        assert client.get_object(Bucket="devstack-proc", Key="x")["Body"].read() == (
            b"from another process"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert not port_file.exists()
    assert not _port_open(port)
