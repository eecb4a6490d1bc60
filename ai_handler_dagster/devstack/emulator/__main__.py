"""Run the emulator as a process: ``python -m ai_handler_dagster.devstack.emulator --help``.

With ``--port 0`` it picks a free port and, given ``--port-file``, writes the port there once it
accepts connections (written atomically, so a reader never sees half a number).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import DEFAULT_TOKEN, EmulatorConfig, Faults
from .server import start_emulator


def build_parser() -> argparse.ArgumentParser:
    """The command line options."""
    p = argparse.ArgumentParser(
        prog="python -m ai_handler_dagster.devstack.emulator",
        description="A Replicate-compatible API server with offline demo models.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    p.add_argument("--latency", type=float, default=1.0, help="model run time in seconds")
    p.add_argument("--latency-jitter", type=float, default=0.0, help="relative spread, 0..1")
    p.add_argument("--concurrency", type=int, default=8, help="hardware slots")
    p.add_argument("--retention", type=float, default=3600.0, help="seconds outputs are kept")
    p.add_argument("--token", default=os.environ.get("EMULATOR_TOKEN", DEFAULT_TOKEN))
    p.add_argument("--webhook-secret", default=None, help="whsec_... (default: from token)")
    p.add_argument("--public-base-url", default=None)
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument(
        "--official-model",
        action="append",
        default=[],
        help="owner/name answering version 'hidden' when run by model path (repeatable)",
    )
    p.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="OWNER/NAME=MODEL",
        help="serve a deployment running a demo model, e.g. acme/sketcher=demo/pixel-sketch "
        "(repeatable)",
    )
    p.add_argument("--rate-limit", action="store_true", help="enforce per-minute limits")
    p.add_argument("--creates-per-minute", type=int, default=600)
    p.add_argument("--requests-per-minute", type=int, default=3000)
    p.add_argument(
        "--creates-burst", type=int, default=None, help="most creates at once (default: a minute's)"
    )
    p.add_argument(
        "--requests-burst",
        type=int,
        default=None,
        help="most other requests at once (default: a minute's)",
    )
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--http-500-rate", type=float, default=0.0)
    p.add_argument("--http-429-rate", type=float, default=0.0)
    p.add_argument("--stuck-rate", type=float, default=0.0)
    p.add_argument("--slow-rate", type=float, default=0.0)
    p.add_argument("--slow-factor", type=float, default=10.0)
    p.add_argument("--drop-create-rate", type=float, default=0.0)
    p.add_argument("--remove-output-rate", type=float, default=0.0)
    p.add_argument("--retry-after", type=int, default=1, help="Retry-After of injected 429s")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The :class:`EmulatorConfig` the options describe."""
    faults = Faults(
        failure_rate=args.failure_rate,
        http_500_rate=args.http_500_rate,
        http_429_rate=args.http_429_rate,
        stuck_rate=args.stuck_rate,
        slow_rate=args.slow_rate,
        slow_factor=args.slow_factor,
        drop_create_rate=args.drop_create_rate,
        remove_output_rate=args.remove_output_rate,
        retry_after_s=args.retry_after,
        seed=args.seed,
    )
    deployments: dict[str, str] = {}
    for option in args.deployment:
        name, sep, target = option.partition("=")
        if not sep:
            raise ValueError(f"--deployment takes OWNER/NAME=MODEL, got {option!r}")
        deployments[name.strip()] = target.strip()
    return EmulatorConfig(
        latency_s=args.latency,
        latency_jitter=args.latency_jitter,
        concurrency=args.concurrency,
        faults=faults,
        retention_s=args.retention,
        token=args.token,
        webhook_secret=args.webhook_secret,
        page_size=args.page_size,
        rate_limit=args.rate_limit,
        creates_per_minute=args.creates_per_minute,
        requests_per_minute=args.requests_per_minute,
        creates_burst=args.creates_burst,
        requests_burst=args.requests_burst,
        public_base_url=args.public_base_url,
        official_models=tuple(args.official_model),
        deployments=deployments,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"invalid emulator settings: {exc}\n")
        return 2
    handle = start_emulator(config, host=args.host, port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(str(handle.port))
        tmp.replace(args.port_file)
    sys.stderr.write(f"replicate emulator listening on {handle.base_url}\n")
    sys.stderr.flush()
    try:
        stop.wait()
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
