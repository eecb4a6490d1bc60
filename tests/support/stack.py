"""The embedded stack in tests: start and read it, the app database's view, waits, evidence.

Used by the end-to-end tests and the guards: one embedded stack per module, rows inserted the way
an application inserts them, waits on real processes, and the evidence to print when one fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from ai_handler_dagster import generations as gens
from ai_handler_dagster import instance, ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation, Hold, LedgerEntry
from ai_handler_dagster.devstack.emulator.control import EmulatorControl
from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.domain import TERMINAL, RunTag
from ai_handler_dagster.proving.stack import ProvingStack
from ai_handler_dagster.settings import DEFAULT_BUCKET

T = TypeVar("T")

#: Settings every e2e stack runs with: the request sensor ticks every second.
FAST_ENV = {"AI_HANDLER_SENSOR_INTERVAL_S": "1"}

#: Generous bounds: the machine may be busy with other work; a healthy stack is far quicker.
SETTLE_TIMEOUT_S = 180.0

TERMINAL_RUN_STATUSES = (
    DagsterRunStatus.SUCCESS,
    DagsterRunStatus.FAILURE,
    DagsterRunStatus.CANCELED,
)


# --- waiting ----------------------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.25,
    describe: Callable[[], object] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy and return that; fail with ``what`` (and
    ``describe()``, the state seen last) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; last seen: {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{seen}")
        time.sleep(interval_s)


NOTABLE = re.compile(r"ERROR|Traceback|Error:|_FAILURE|Detected run|by signal")


# --- the stack --------------------------------------------------------------------------------


def log_tails(stack: Stack, lines: int = 60, notable: int = 40) -> str:
    """For every log file of the stack (emulator, S3, daemon, dagster dev): its notable lines
    (errors, failures, run monitoring's verdicts) from anywhere in it, then its last lines."""
    parts = []
    for path in sorted(Path(stack.logs_dir).glob("*.log")):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").splitlines()
            marked = [line for line in text[:-lines] if NOTABLE.search(line)]
            if marked:
                parts.append(f"===== {path.name} (notable earlier lines, last {notable}) =====")
                parts.extend(marked[-notable:])
            parts.append(f"===== {path.name} (last {lines} lines) =====")
            parts.extend(text[-lines:])
    return "\n".join(parts) if parts else "(no stack logs)"


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[ProvingStack]:
    """A started stack, always stopped afterwards (so no process outlives the test module).

    It is a :class:`ProvingStack`: the tests drive it from outside as the chaos soak does (they
    kill its run workers, and check first that a pid is one of its processes).

    If starting it, or the fixture's setup around it, fails, the tails of its logs are printed
    (a failing test gets them attached to its report by the conftest instead)."""
    stack = ProvingStack(config)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(log_tails(stack))
        raise
    finally:
        stack.stop()


def stack_config(state_dir: Path, **overrides: Any) -> StackConfig:
    """The e2e stack: short emulator latency, the request sensor every second."""
    settings: dict[str, Any] = {
        "state_dir": state_dir,
        "latency_s": 0.3,
        "concurrency": 8,
        "instance_overrides": dict(instance.TEST_OVERRIDES),
    }
    settings.update(overrides)
    extra_env = {**FAST_ENV, **settings.pop("extra_env", {})}
    return StackConfig(extra_env=extra_env, **settings)


@contextlib.contextmanager
def stack_on(
    dialect: str, state_dir: Path, pg_available: bool, **overrides: Any
) -> Iterator[StackUnderTest]:
    """The e2e stack (``stack_config`` with ``overrides``) on SQLite everywhere or on fresh
    PostgreSQL databases for the app and Dagster's storage, with the app database it serves."""
    from tests.support.db import pg_databases

    if dialect == "sqlite":
        with running_stack(stack_config(state_dir, **overrides)) as stack:
            yield StackUnderTest(stack, App(stack.app_db_url))
        return
    with pg_databases(pg_available) as dbs:
        config = stack_config(
            state_dir,
            storage="postgres",
            dagster_pg_url=dbs.dagster_url,
            app_db_url=dbs.app_url,
            **overrides,
        )
        with running_stack(config) as stack:
            app = App(stack.app_db_url)
            try:
                yield StackUnderTest(stack, app)
            finally:
                app.engine.dispose()


@contextlib.contextmanager
def dagster_instance(stack: Stack) -> Iterator[DagsterInstance]:
    """The stack's Dagster instance, opened from this process (read its runs, cancel one)."""
    instance = DagsterInstance.from_config(str(stack.dagster_home))
    try:
        yield instance
    finally:
        instance.dispose()


def s3_keys(stack: Stack, prefix: str) -> list[str]:
    """Every key of the outputs bucket under ``prefix``, listed through the S3 API."""
    client = stack.s3_client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=DEFAULT_BUCKET, Prefix=prefix
    ):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def s3_body(stack: Stack, key: str) -> bytes:
    return stack.s3_client().get_object(Bucket=DEFAULT_BUCKET, Key=key)["Body"].read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def emulator(stack: Stack) -> EmulatorControl:
    return EmulatorControl(stack.emulator_url)


def predictions_with_prompt(stack: Stack, prompt: str) -> list[dict[str, Any]]:
    """The emulator's predictions (its private view, paid or not) for one unique prompt."""
    with emulator(stack) as control:
        return [p for p in control.predictions() if (p.get("input") or {}).get("prompt") == prompt]


# --- Dagster runs -----------------------------------------------------------------------------


def runs_of_batch(instance: DagsterInstance, batch_key: str) -> list[DagsterRun]:
    """Every run (retries included) that worked on the batch, oldest first."""
    runs = instance.get_runs(filters=RunsFilter(tags={RunTag.BATCH: batch_key}))
    return sorted(runs, key=lambda run: instance.get_run_record_by_id(run.run_id).create_timestamp)  # type: ignore[union-attr]


def wait_batch_runs_finished(
    instance: DagsterInstance, batch_key: str, timeout_s: float = SETTLE_TIMEOUT_S
) -> list[DagsterRun]:
    """Wait until the batch has runs and all of them finished (no retry pending); return them."""

    def finished() -> list[DagsterRun] | None:
        runs = runs_of_batch(instance, batch_key)
        if not runs or any(run.status not in TERMINAL_RUN_STATUSES for run in runs):
            return None
        return runs

    return wait_for(
        finished,
        timeout_s=timeout_s,
        what=f"the runs of batch {batch_key} to finish",
        describe=lambda: [(r.run_id, r.status.value) for r in runs_of_batch(instance, batch_key)],
    )


def run_events(instance: DagsterInstance, run_id: str) -> list[str]:
    """A run's event log as short lines (for failure messages)."""
    lines = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        kind = event.event_type_value if event else "log"
        message = (event.message if event else None) or entry.user_message
        lines.append(f"{kind}: {message[:300]}")
    return lines


def graphql(webserver_url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    """One GraphQL request to the webserver; GraphQL-level errors fail the test."""
    response = httpx.post(
        f"{webserver_url}/graphql",
        json={"query": query, "variables": variables},
        timeout=60,
        trust_env=False,
    )
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


# --- the application's side -------------------------------------------------------------------


@dataclass
class App:
    """What an application and an auditor see: the app database."""

    url: str
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.url)

    def grant(self, user: str, amount: int) -> None:
        with session_scope(self.engine) as session:
            ledger.grant(session, user, amount, key=f"e2e-grant:{user}")

    def insert(
        self,
        user: str,
        model: str,
        payload: dict[str, Any],
        *,
        status: str | None = None,
        created_at: datetime | None = None,
    ) -> int:
        """Insert a generation with plain SQL, as an application would (no project code)."""
        columns = {"user_id": user, "model": model, "input": json.dumps(payload)}
        if status is not None:
            columns["status"] = status
        if created_at is not None:
            # The app database stores UTC; SQLite as naive text, PostgreSQL as timestamptz.
            columns["created_at"] = (
                created_at.replace(tzinfo=None).isoformat(sep=" ")
                if self.engine.dialect.name == "sqlite"
                else created_at.isoformat()
            )
        names = ", ".join(columns)
        values = ", ".join(f":{name}" for name in columns)
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    sa.text(f"INSERT INTO generations ({names}) VALUES ({values}) RETURNING id"),
                    columns,
                ).scalar_one()
            )

    def rows(self, ids: Sequence[int]) -> dict[int, Generation]:
        with session_scope(self.engine) as session:
            found = list(session.scalars(sa.select(Generation).where(Generation.id.in_(ids))))
            session.expunge_all()
        return {row.id: row for row in found}

    def row(self, generation_id: int) -> Generation:
        return self.rows([generation_id])[generation_id]

    def statuses(self, ids: Sequence[int]) -> dict[int, str]:
        return {gid: row.status for gid, row in self.rows(ids).items()}

    def wait_terminal(
        self, ids: Sequence[int], timeout_s: float = SETTLE_TIMEOUT_S
    ) -> dict[int, Generation]:
        """Wait until every generation ended (succeeded, failed or canceled)."""

        def settled() -> dict[int, Generation] | None:
            rows = self.rows(ids)
            done = len(rows) == len(ids) and all(r.status in TERMINAL for r in rows.values())
            return rows if done else None

        return wait_for(
            settled,
            timeout_s=timeout_s,
            what=f"generations {list(ids)} to settle",
            describe=lambda: self.statuses(ids),
        )

    def holds(self, generation_id: int) -> list[Hold]:
        """Every hold ever taken for the generation (all attempts)."""
        with session_scope(self.engine) as session:
            found = list(
                session.scalars(
                    sa.select(Hold).where(Hold.generation_id == generation_id).order_by(Hold.id)
                )
            )
            session.expunge_all()
        return found

    def entry_kinds(self, hold_id: int) -> list[str]:
        """The kinds of the ledger entries of one hold, in order (``hold``, then its ending)."""
        with session_scope(self.engine) as session:
            return list(
                session.scalars(
                    sa.select(LedgerEntry.kind)
                    .where(LedgerEntry.hold_id == hold_id)
                    .order_by(LedgerEntry.id)
                )
            )

    def balance(self, user: str) -> ledger.Balance:
        with session_scope(self.engine) as session:
            return ledger.balance(session, user)

    def violations(self) -> list[str]:
        """Everything ``ledger.verify`` and ``generations.verify`` find wrong (empty: clean)."""
        with session_scope(self.engine) as session:
            return [str(v) for v in (*ledger.verify(session), *gens.verify(session))]


@dataclass
class StackUnderTest:
    """A running stack and the app database it serves."""

    stack: ProvingStack
    app: App


def unique(label: str) -> str:
    """A name no other test (or earlier run of this one) uses."""
    return f"{label}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
