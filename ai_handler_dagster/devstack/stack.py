"""The embedded stack: every process the project needs on one machine, started and stopped as one.

- the Replicate emulator and the local S3 endpoint (subprocesses on free loopback ports),
- the HTTP API (``ai-handler serve``, one worker), which also receives the emulator's webhooks,
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
    #: Give the API the signing secret and have creates ask for its webhooks (else poll only).
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
        self.api_url = ""
        self.webhook_url = ""
        self.dagster_home = config.state_dir / "dagster_home"
        self.logs_dir = config.state_dir / "logs"
        self.app_db_url = config.app_db_url or f"sqlite:///{config.state_dir / 'app.db'}"
        self._log_files: list[object] = []
        self._lock: IO[str] | None = None
        self._key_id: str | None = None

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
            self._start_api()
            if self.config.webserver_port is not None:
                self._start_dagster_dev()
            elif self.config.daemon:
                self._start_daemon()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process (daemon first, so no new run starts), revoke the local key, then
        close the logs."""
        for name in reversed(list(self.processes)):
            self._terminate(name)
        self.processes.clear()
        if self._key_id is not None:
            self._revoke_local_key(self._key_id)
            self._key_id = None
        for handle in self._log_files:
            handle.close()  # type: ignore[attr-defined]
        self._log_files.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def local_api_key(self) -> str:
        """A key for the stack's API (``api_url``), made at the first call and revoked when the
        stack stops, so no key outlives the processes it was shown for.

        An admin key: it belongs to the local operator, who can already grant credits with the
        CLI on this database; read+submit would only hide ``POST /v1/users/{user}/grants`` and
        the other admin routes from the person trying them.
        """
        from ai_handler_dagster.api import keys
        from ai_handler_dagster.db.engine import make_engine, session_scope

        if self._key_id is not None:
            raise RuntimeError("the local key was made already; it is shown once")
        with session_scope(make_engine(self.app_db_url)) as session:
            full, info = keys.create(session, name="local operator", scopes=[keys.ADMIN])
        self._key_id = info.key_id
        return full

    def _revoke_local_key(self, key_id: str) -> None:
        from ai_handler_dagster.api import keys
        from ai_handler_dagster.db.engine import make_engine, session_scope

        try:
            with session_scope(make_engine(self.app_db_url)) as session:
                keys.revoke(session, key_id)
        except Exception as exc:  # stopping must go on; the key stays listed in `keys list`
            sys.stderr.write(f"could not revoke the local API key {key_id}: {exc}\n")

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

    def _start_api(self) -> None:
        """``ai-handler serve`` on a free port; with webhooks, only it holds the signing secret
        (fetched from the emulator as from Replicate) and creates name its webhook route."""
        from ai_handler_dagster.webhooks.config import SECRET_VAR, fetch_secret
        from ai_handler_dagster.webhooks.receiver import WEBHOOK_PATH

        extra_env = {}
        if self.config.webhooks:
            # The emulator may be injecting 500s already.
            extra_env[SECRET_VAR] = retries.retrying(attempts=5, base_s=0.5, retry_on=Exception)(
                fetch_secret, self.emulator_url, EMULATOR_TOKEN
            )
        port_file = self.config.state_dir / "api.port"
        port_file.unlink(missing_ok=True)
        proc = self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "ai_handler_dagster.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
            ],
            extra_env=extra_env,
        )
        self.api_url = f"http://127.0.0.1:{self._read_port(port_file, proc, 60)}"
        self._wait_ready(self.api_url + "/readyz", proc, 60)
        if self.config.webhooks:
            self.webhook_url = self.api_url + WEBHOOK_PATH

    @staticmethod
    def _read_port(path: Path, proc: subprocess.Popen, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with code {proc.returncode} before listening")
            text = path.read_text().strip() if path.exists() else ""
            if text:
                return int(text)
            time.sleep(0.1)
        raise TimeoutError(f"no port in {path} after {timeout_s:.0f}s")

    @staticmethod
    def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with code {proc.returncode} before ready")
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")

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
