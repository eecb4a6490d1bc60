"""``ai-handler dev``: the embedded stack with the Dagster UI and the HTTP API, in the foreground
until Ctrl-C; prints the API's URL and a local key (revoked when it stops)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from ai_handler_dagster.devstack.stack import Stack, StackConfig, wait_for_port
from ai_handler_dagster.settings import DEFAULT_BUCKET

DEV_USER = "demo"


def cmd_dev(args: argparse.Namespace) -> int:
    """Start the emulator, local S3, the API and ``dagster dev`` (UI + daemon); grant the demo
    user; print where everything is and a key for the API."""
    from ai_handler_dagster import ledger
    from ai_handler_dagster.db.engine import make_engine, session_scope

    config = StackConfig(
        latency_s=args.latency,
        concurrency=args.concurrency,
        failure_rate=args.failure_rate,
        webserver_port=args.port,
        log_to_files=False,
    )
    stack = Stack(config)
    out = sys.stderr
    out.write(f"Starting the embedded stack in {config.state_dir} ...\n")
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    with stack:
        stack.apply_env()
        with session_scope(make_engine(stack.app_db_url)) as session:
            # Granted once per state folder: the key makes a restart a no-op.
            ledger.grant(session, DEV_USER, args.credits, key=f"dev-grant:{DEV_USER}")
            credits = ledger.balance(session, DEV_USER)
        key = stack.local_api_key()
        wait_for_port("127.0.0.1", args.port, 120, stack.processes.get("dagster-dev"))
        out.write(
            "\nai_handler_dagster is up.\n"
            f"  Dagster UI          http://127.0.0.1:{args.port}\n"
            f"  HTTP API            {stack.api_url} (docs at {stack.api_url}/docs)\n"
            f"  API key (admin)     {key}\n"
            "                      (valid until this stack stops)\n"
            f"  Replicate emulator  {stack.emulator_url}\n"
            f"  local S3            {stack.s3_url} (bucket {DEFAULT_BUCKET})\n"
            f"  app database        {stack.app_db_url}\n"
            f"  user {DEV_USER!r} has {credits.available} credits available\n\n"
            "Submit a generation from another terminal in this folder:\n"
            f"  .venv/bin/ai-handler submit --user {DEV_USER} --model demo/pixel-sketch "
            '--input \'{"prompt": "a lighthouse at dusk"}\'\n'
            "Then watch it in the UI (Runs), or: .venv/bin/ai-handler status <id>\n"
            "Or ask the API who the key is:\n"
            f"  curl -H 'Authorization: Bearer {key}' {stack.api_url}/v1/key\n"
            "Ctrl-C stops everything.\n"
        )
        try:
            while not stopping:
                proc = stack.processes.get("dagster-dev")
                if proc is None or proc.poll() is not None:
                    out.write("dagster dev exited; stopping\n")
                    return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        out.write("\nStopping ...\n")
    return 0


def register(sub: Any) -> None:
    dev = sub.add_parser("dev", help="run the embedded stack with the Dagster UI (Ctrl-C stops)")
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    dev.add_argument("--latency", type=float, default=2.0, help="emulated model seconds")
    dev.add_argument("--concurrency", type=int, default=16, help="emulated hardware slots")
    dev.add_argument("--failure-rate", type=float, default=0.0, help="model failure rate 0..1")
    dev.add_argument("--credits", type=int, default=1000, help="credits for the demo user")
    dev.set_defaults(handler=cmd_dev)
