"""A local S3-compatible endpoint for the embedded stack and tests (moto in server mode).

In-process::

    s3 = start_local_s3()            # free port on 127.0.0.1, bucket created
    s3.endpoint_url                  # "http://127.0.0.1:<port>"
    s3.stop()

As its own process (the embedded stack runs it this way so that Dagster run workers in other
processes reach it over HTTP)::

    python -m ai_handler_dagster.devstack.s3 --port 0 --port-file .state/s3.port

The port file is written (atomically) only once the server answers and the bucket exists. The
endpoint accepts any credentials; clients use the fake ``test``/``test`` keys below. All
endpoints started in one process share moto's in-memory state, and nothing is persisted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

DEFAULT_BUCKET = "ai-handler-outputs"
#: Fake credentials: moto accepts anything, but boto3 refuses to sign without some.
ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"
REGION = "us-east-1"


def local_s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for a local endpoint, with the fake credentials."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )


@dataclasses.dataclass
class LocalS3:
    """A running local S3 endpoint with its bucket."""

    endpoint_url: str
    bucket: str
    host: str
    port: int
    _server: ThreadedMotoServer = dataclasses.field(repr=False)

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        return local_s3_client(self.endpoint_url)

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.stop()
        # ThreadedMotoServer.stop() shuts the loop down but leaves the listening socket open.
        inner = getattr(self._server, "_server", None)
        if inner is not None:
            inner.server_close()

    def __enter__(self) -> LocalS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_s3(host: str = "127.0.0.1", port: int = 0, bucket: str = DEFAULT_BUCKET) -> LocalS3:
    """Start moto's S3 server in a background thread and create ``bucket``.

    ``port=0`` picks a free port; the chosen one is in ``.port`` and ``.endpoint_url``.
    """
    # werkzeug logs every request at INFO on stderr; keep the embedded stack's output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    endpoint = f"http://{shown_host}:{bound_port}"
    local = LocalS3(
        endpoint_url=endpoint, bucket=bucket, host=bound_host, port=bound_port, _server=server
    )
    try:
        # In us-east-1 creating a bucket you already own succeeds, so a restart is harmless.
        local.client().create_bucket(Bucket=bucket)
    except BaseException:
        local.stop()
        raise
    return local


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # readers never see a half-written port


def main(argv: Sequence[str] | None = None) -> int:
    """Run a local S3 endpoint until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="Local S3-compatible endpoint (moto).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create")
    parser.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    local = start_local_s3(args.host, args.port, args.bucket)
    try:
        if args.port_file is not None:
            _write_atomically(args.port_file, f"{local.port}\n")
        sys.stdout.write(f"local S3 at {local.endpoint_url} (bucket {local.bucket})\n")
        sys.stdout.flush()
        # Wake up regularly rather than block forever, so a signal is acted on promptly.
        while not stop.wait(0.5):
            pass
    finally:
        local.stop()
        if args.port_file is not None:
            args.port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
