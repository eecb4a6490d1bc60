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

Outages (for the chaos soak): ``LocalS3.outage(seconds)``, or ``SIGUSR1`` to the process, stops
answering for ``--outage-seconds``: the listening socket and every open connection are closed,
then the endpoint listens again on the same port. The objects survive, as they do on real S3
when an endpoint goes away for a while; restarting the process instead would lose them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from ai_handler_dagster.settings import DEFAULT_BUCKET

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


class _MotoServer:
    """moto's S3 app on a threaded werkzeug server that can drop every connection it holds.

    moto's own ``ThreadedMotoServer`` binds inside its thread (a failed bind hangs ``start``)
    and leaves keep-alive connections served after ``stop``; an outage must end those too.
    """

    def __init__(self, host: str, port: int) -> None:
        # Binds here, in the caller's thread, so a port that is taken raises at once.
        self.server: BaseWSGIServer = make_server(
            host,
            port,
            DomainDispatcherApplication(create_backend_app),
            threaded=True,
            request_handler=MotoRequestHandler,
        )
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        process_request = self.server.process_request
        shutdown_request = self.server.shutdown_request

        def track(request: Any, client_address: Any) -> None:
            with self._lock:
                self._connections.add(request)
            process_request(request, client_address)

        def untrack(request: Any) -> None:
            with self._lock:
                self._connections.discard(request)
            shutdown_request(request)

        self.server.process_request = track  # type: ignore[method-assign]
        self.server.shutdown_request = untrack  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="local-s3", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, close the listening socket and cut every open connection."""
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            open_now = list(self._connections)
            self._connections.clear()
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


@dataclasses.dataclass
class LocalS3:
    """A running local S3 endpoint with its bucket."""

    endpoint_url: str
    bucket: str
    host: str
    port: int
    _server: _MotoServer = dataclasses.field(repr=False)

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        return local_s3_client(self.endpoint_url)

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.stop()

    def outage(self, seconds: float) -> None:
        """Answer nothing for ``seconds``, then serve again on the same port with every object.

        Clients see refused connections (and open connections cut) for the duration, as during
        an S3 endpoint outage; moto's in-memory store lives in this process, so nothing is lost.
        """
        self._server.stop()
        time.sleep(seconds)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._server = _MotoServer(self.host, self.port)
                return
            except OSError:
                # The port is briefly unavailable (a lingering socket): try again shortly.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

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
    server = _MotoServer(host, port)
    bound_host, bound_port = server.address
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
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=5.0,
        help="how long SIGUSR1 takes the endpoint offline (objects are kept)",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    outage = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def _on_outage(signum: int, frame: FrameType | None) -> None:
        outage.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGUSR1, _on_outage)

    local = start_local_s3(args.host, args.port, args.bucket)
    try:
        if args.port_file is not None:
            _write_atomically(args.port_file, f"{local.port}\n")
        sys.stdout.write(f"local S3 at {local.endpoint_url} (bucket {local.bucket})\n")
        sys.stdout.flush()
        # Wake up regularly rather than block forever, so a signal is acted on promptly.
        while not stop.wait(0.2):
            if outage.is_set():
                outage.clear()
                sys.stdout.write(f"outage: offline for {args.outage_seconds:g}s\n")
                sys.stdout.flush()
                local.outage(args.outage_seconds)
                sys.stdout.write(f"outage over: serving {local.endpoint_url} again\n")
                sys.stdout.flush()
    finally:
        local.stop()
        if args.port_file is not None:
            args.port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
