"""The embedded stack: every process the project needs on one machine, started and stopped as one.

- the Replicate emulator and the local S3 endpoint (subprocesses on free loopback ports),
- a Dagster instance in the state folder (SQLite by default, PostgreSQL on request),
- ``dagster-daemon`` (sensors, run queue, run monitoring), and optionally the webserver/UI.

``ai-handler dev``, ``ai-handler demo`` and the end-to-end tests use it: the same processes and
configuration production runs, only pointed at local parts. The benchmark and the chaos soak run
it as :class:`ai_handler_dagster.proving.stack.ProvingStack`, which adds the pids and the process
faults they need.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from ai_handler_dagster import instance, retries, settings

#: Token the emulator accepts (not a secret: the emulator only listens on loopback).
EMULATOR_TOKEN = "r8_emulator_token"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts connections on host:port (or fail with a clear error)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


@dataclass
class StackConfig:
    """What to start. Defaults: the embedded setup (SQLite everywhere, daemon, no UI)."""

    state_dir: Path = field(default_factory=settings.state_dir)
    storage: Literal["sqlite", "postgres"] = "sqlite"
    dagster_pg_url: str | None = None
    app_db_url: str | None = None
    latency_s: float = 1.0
    concurrency: int = 16
    failure_rate: float = 0.0
    emulator_args: list[str] = field(default_factory=list)
    #: Changes to the shipped ``dagster.yaml``, by dotted key (``instance.local_config``); the
    #: default, none, runs the settings production runs.
    instance_overrides: dict[str, Any] = field(default_factory=dict)
    daemon: bool = True
    webserver_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to_files: bool = True
    #: Run the webhook receiver and have creates ask for completion webhooks (else poll only).
    webhooks: bool = True
    #: The workspace Dagster loads; the default, the repository's ``workspace.yaml``, runs the
    #: project's code location.
    workspace: Path = instance.WORKSPACE_FILE


class Stack:
    """Start with ``start()`` (or ``with Stack(cfg) as stack``), stop with ``stop()``.

    Every process is started in its own process group and stopped with its children, so nothing
    it started outlives it.
    """

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.processes: dict[str, subprocess.Popen] = {}
        self.emulator_url = ""
        self.s3_url = ""
        self.webhook_url = ""
        self.dagster_home = config.state_dir / "dagster_home"
        self.logs_dir = config.state_dir / "logs"
        self.app_db_url = config.app_db_url or f"sqlite:///{config.state_dir / 'app.db'}"
        self._log_files: list[object] = []
        self._lock: IO[str] | None = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._prepare()
            self._start_emulator()
            self._start_s3()
            if self.config.webhooks:
                self._start_webhooks()
            if self.config.webserver_port is not None:
                self._start_dagster_dev()
            elif self.config.daemon:
                self._start_daemon()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process (daemon first, so no new run starts), then close the logs."""
        for name in reversed(list(self.processes)):
            self._terminate(name)
        self.processes.clear()
        for handle in self._log_files:
            handle.close()  # type: ignore[attr-defined]
        self._log_files.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def instance_config(self) -> dict[str, Any]:
        """The stack's Dagster instance: the shipped settings with its overrides and storage."""
        if self.config.storage == "postgres" and not self.config.dagster_pg_url:
            raise settings.ConfigError("postgres storage needs a Dagster PostgreSQL URL")
        return instance.local_config(
            postgres_url=self.config.dagster_pg_url if self.config.storage == "postgres" else None,
            overrides=self.config.instance_overrides,
        )

    def overrides(self) -> dict[str, dict[str, Any]]:
        """What this stack runs differently from production's settings: the instance settings
        that differ from the shipped ``dagster.yaml`` (storage aside), and the project's own
        settings it sets (``AI_HANDLER_*`` variables beyond the stack's endpoints)."""
        return {
            "instance": instance.differences(self.instance_config()),
            "app": {k: v for k, v in sorted(self.config.extra_env.items()) if k.startswith("AI_")},
        }

    # ----------------------------------------------------------------- environment

    def env(self) -> dict[str, str]:
        """Environment for anything that talks to this stack (CLI, daemon, run workers)."""
        env = dict(os.environ)
        env.update(
            {
                settings.ENV_VAR: "embedded",
                settings.STATE_DIR_VAR: str(self.config.state_dir),
                settings.DATABASE_URL_VAR: self.app_db_url,
                "DAGSTER_HOME": str(self.dagster_home),
                "REPLICATE_API_TOKEN": EMULATOR_TOKEN,
                "REPLICATE_BASE_URL": self.emulator_url,
                "AI_HANDLER_S3_ENDPOINT_URL": self.s3_url,
                "AI_HANDLER_S3_BUCKET": settings.DEFAULT_BUCKET,
                # The local S3 endpoint accepts any keys; real ones never reach it.
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1",
                "DAGSTER_DISABLE_TELEMETRY": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.webhook_url:
            env["AI_HANDLER_WEBHOOK_URL"] = self.webhook_url
        env.update(self.config.extra_env)
        return env

    def apply_env(self) -> None:
        """Make this process talk to the stack too (the CLI's submit/status, tests)."""
        os.environ.update(self.env())

    # ----------------------------------------------------------------- parts

    def _lock_state_dir(self) -> None:
        """One stack per state folder: a second one would claim the first one's requests and
        store their outputs in its own S3."""
        lock = open(self.config.state_dir / ".stack.lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise settings.ConfigError(
                f"another embedded stack (ai-handler dev, demo, bench?) is running in "
                f"{self.config.state_dir}; stop it, or use another AI_HANDLER_STATE_DIR"
            ) from None
        self._lock = lock

    def _prepare(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        instance.write(self.dagster_home, self.instance_config())
        from ai_handler_dagster.db import upgrade

        upgrade(self.app_db_url)

    def _spawn(
        self, name: str, args: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        if self.config.log_to_files:
            log = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._log_files.append(log)
            out: IO[bytes] | None = log
        else:
            out = None
        proc = subprocess.Popen(
            args,
            env={**self.env(), **(extra_env or {})},
            cwd=str(self.config.state_dir),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def _start_emulator(self) -> None:
        port = free_port()
        proc = self._spawn(
            "emulator",
            [
                sys.executable,
                "-m",
                "ai_handler_dagster.devstack.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--latency",
                str(self.config.latency_s),
                "--concurrency",
                str(self.config.concurrency),
                "--failure-rate",
                str(self.config.failure_rate),
                *self.config.emulator_args,
            ],
        )
        wait_for_port("127.0.0.1", port, 30, proc)
        self.emulator_url = f"http://127.0.0.1:{port}"

    def _start_webhooks(self) -> None:
        """The webhook receiver; only it holds the signing secret (fetched like on Replicate)."""
        from ai_handler_dagster.webhooks.config import SECRET_VAR, fetch_secret

        # The emulator may be injecting 500s already.
        secret = retries.retrying(attempts=5, base_s=0.5, retry_on=Exception)(
            fetch_secret, self.emulator_url, EMULATOR_TOKEN
        )
        port = free_port()
        proc = self._spawn(
            "webhooks",
            [
                sys.executable,
                "-m",
                "ai_handler_dagster.webhooks",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            extra_env={SECRET_VAR: secret},
        )
        wait_for_port("127.0.0.1", port, 30, proc)
        self.webhook_url = f"http://127.0.0.1:{port}/webhooks/replicate"

    def _start_s3(self) -> None:
        port = free_port()
        self._spawn_s3(port)
        self.s3_url = f"http://127.0.0.1:{port}"
        self._wait_for_bucket()

    def _spawn_s3(self, port: int) -> None:
        """Start the local S3 endpoint on ``port`` and wait until it accepts connections."""
        proc = self._spawn(
            "s3",
            [sys.executable, "-m", "ai_handler_dagster.devstack.s3", "--port", str(port)],
        )
        wait_for_port("127.0.0.1", port, 60, proc)

    def s3_client(self) -> Any:
        """A boto3 client for the stack's local S3 endpoint (it accepts any credentials)."""
        from ai_handler_dagster.devstack.s3 import local_s3_client

        return local_s3_client(self.s3_url)

    def _wait_for_bucket(self) -> None:
        client = self.s3_client()
        retries.polling(timeout_s=30, interval_s=0.2, retry_on=Exception)(
            client.head_bucket, Bucket=settings.DEFAULT_BUCKET
        )

    def _dagster_bin(self, name: str) -> str:
        candidate = Path(sys.executable).with_name(name)
        return str(candidate) if candidate.exists() else (shutil.which(name) or name)

    def _start_daemon(self) -> None:
        self._spawn(
            "daemon",
            [
                sys.executable,
                "-m",
                "ai_handler_dagster.runtime.daemon",
                "run",
                "-w",
                str(self.config.workspace),
            ],
        )

    def _start_dagster_dev(self) -> None:
        assert self.config.webserver_port is not None
        self._spawn(
            "dagster-dev",
            [
                self._dagster_bin("dagster"),
                "dev",
                "-w",
                str(self.config.workspace),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.config.webserver_port),
            ],
        )

    def _terminate(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        # Children that left the group's leader behind (run workers of the code server).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
