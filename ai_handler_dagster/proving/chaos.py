"""``ai-handler chaos``: a seeded soak through the real stack, with faults, then an audit.

The stack runs as in production (app database and Dagster storage on PostgreSQL, the Replicate
emulator, the local S3 endpoint, the HTTP API that receives the webhooks, and a real
``dagster-daemon``). An application's load arrives over a window: several users, two of them
racing on balances too small for all their requests, so some must be refused with
``insufficient_credits``. The load
mixes every kind of price: images per output (``num_outputs`` from 1 to the price's maximum, or
left out), text per token (``max_tokens`` short enough to cut the text, up to the maximum, or
left out), and the two models pinned to their versions, which the soak's price table charges per
second of ``predict_time`` and at a fixed price. Meanwhile faults land on a schedule derived
from ``--seed``:

- the emulator's own (seeded): model failures, HTTP 500 on any endpoint, 429 with
  ``Retry-After``, creates accepted and then the connection dropped, stuck predictions, outputs
  removed before anyone downloads them; stuck predictions meet a short prediction deadline;
- processes: run workers SIGKILLed mid-run, the daemon killed and restarted (its code server and
  run workers go with it), an outage of the S3 endpoint (it keeps its objects, as real S3 does),
  and every connection to the app database terminated with ``pg_terminate_backend``;
- a rate-limited phase: for a window in the middle of the arrivals the emulator enforces a low
  create limit (``--rate-limit``, 20 a minute with a burst of 2), answering 429 with
  ``Retry-After`` and ``ratelimit-*`` headers. Under the create throttle a 429 spends none of a
  create's retries: a throttled generation waits for its turn, and fails only at its queue
  deadline, with ``deadline_exceeded`` and refunded (a failure, not a violation). The report
  counts those (failed before any create) and, should one ever occur, failures with
  ``rate_limited``.

When every generation has ended, :mod:`ai_handler_dagster.proving.audit` checks the money, the
outputs and the provider's side independently of the code that moved them, and each hold and
charge against the soak's price table and the counts the emulator reported. The result is a table
(or one JSON object with ``--json``); the exit code is 1 on any violation, including a fault the
schedule promised but could not inject.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from ai_handler_dagster import retries
from ai_handler_dagster.devstack.emulator import MODELS, EmulatorControl
from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.domain import TERMINAL, UNSUCCESSFUL, GenerationStatus
from ai_handler_dagster.instance import WORKSPACE_FILE
from ai_handler_dagster.pricing import PriceBook
from ai_handler_dagster.proving import audit
from ai_handler_dagster.proving.stack import DEFAULT_PG_URL, ProvingStack, scratch_databases
from ai_handler_dagster.settings import DEFAULT_BUCKET

MODEL = "demo/pixel-sketch"
#: The name the emulator answers creates of MODEL with, as Replicate does for some official
#: models: adoption must learn it.
MODEL_ALIAS = "demo/pixel-sketch-official"
#: The emulator's text model, priced per token by the shipped table.
TEXT_MODEL = "demo/haiku-text"
#: The same two models pinned to their versions, as a team runs its own fine-tunes: the soak's
#: price table charges the image model's version per second of predict_time and the text
#: model's version a fixed price, so that every kind of price is in the mix.
METERED_MODEL = f"{MODEL}:{MODELS[MODEL].version_id}"
FIXED_MODEL = f"{TEXT_MODEL}:{MODELS[TEXT_MODEL].version_id}"
#: The emulator's test model; its empty-output misbehaviours succeed with nothing to store.
EMPTY_MODEL = "test/bad-output"
EMPTY_KINDS = ("empty-null", "empty-string", "empty-list", "empty-chunk")
#: The soak's own prices, added to the shipped table (which prices MODEL per output and
#: TEXT_MODEL per token). The empty-output model costs what one image does.
SOAK_PRICES = f"""
[models."{METERED_MODEL}"]
credits_per_second = 2.5
max_seconds = 12

[models."{FIXED_MODEL}"]
credits = 7

[models."{EMPTY_MODEL}"]
credits = 5
"""
#: Shares of each model in the load (before repeats and empty outputs are drawn).
MODEL_SHARES = ((MODEL, 0.4), (TEXT_MODEL, 0.25), (METERED_MODEL, 0.2), (FIXED_MODEL, 0.15))
#: Values drawn for the counted prices' input fields; None leaves the field out (its default).
#: Both lists include the price's maximum (the image model's 4 outputs, the text model's 512
#: tokens) and the text model's short caps cut its haiku (about a dozen tokens) short.
NUM_OUTPUTS = (None, 1, 2, 3, 4, 4)
MAX_TOKENS = (None, 3, 8, 16, 512)
#: Shares of the rich users' load: repeats of an earlier request's exact input, requests that
#: succeed with an empty output, and regenerates of succeeded generations (extra actions).
IDENTICAL_SHARE = 0.08
EMPTY_SHARE = 0.03
REGENERATE_SHARE = 0.03

#: ``application_name`` of the soak's own app-database connections (the application inserting
#: requests, the progress and audit queries): the faults target the project's connections.
APPLICATION_NAME = "ai-handler-chaos"

#: Emulator fault rates of the soak (each a probability per request or per prediction).
EMULATOR_FAULTS = {
    "failure_rate": 0.10,
    "http_500_rate": 0.05,
    "http_429_rate": 0.05,
    "drop_create_rate": 0.02,
    "stuck_rate": 0.02,
    "remove_output_rate": 0.01,
}

#: What the audit's price checks count per price kind (see ``AuditReport.price_checks``).
PRICE_TALLIES = ("holds", "charges", "unpaid", "mismatches")
#: The emulator's create routes (labels of its request counts).
CREATE_ROUTES = ("POST /v1/predictions", "POST /v1/models/{owner}/{name}/predictions")

#: How the table names each fault kind (JSON keys on the left).
FAULT_LABELS = {
    "model_failure": "emulator: model failures",
    "http_500": "emulator: HTTP 500",
    "http_429": "emulator: HTTP 429 with Retry-After",
    "create_dropped": "emulator: creates accepted, answer dropped",
    "stuck": "emulator: stuck predictions",
    "output_removed": "emulator: outputs removed before download",
    "worker_kill": "run workers SIGKILLed",
    "daemon_restart": "dagster-daemon killed and restarted",
    "daemon_restart_workers": "  run workers that died with it",
    "s3_outage": "S3 endpoint outages",
    "pg_terminate": "app DB: pg_terminate_backend rounds",
    "pg_backends_terminated": "  connections terminated",
}


@dataclass
class ChaosConfig:
    """One soak."""

    seed: int = 1
    count: int = 300
    users: int = 6
    #: Of ``users``, how many race on balances too small for all their requests.
    poor_users: int = 2
    latency: float = 1.0
    concurrency: int = 16
    deadline_s: int = 20
    worker_kills: int = 5
    pg_terminations: int = 2
    #: Seconds over which requests arrive (default: from ``count``).
    window_s: float | None = None
    timeout_s: float = 1800.0
    pg_admin_url: str = DEFAULT_PG_URL
    max_batch: int = 8
    keep: bool = False
    #: The create limit the emulator enforces during the rate-limited phase (creates a minute;
    #: 0: no such phase) and its burst.
    rate_limit: int = 20
    rate_limit_burst: int = 2

    @property
    def arrival_window_s(self) -> float:
        return self.window_s if self.window_s is not None else max(40.0, self.count * 0.3)


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One generation request the application will insert ``at_s`` seconds into the soak."""

    at_s: float
    user: str
    input: dict[str, Any]
    model: str = MODEL


@dataclass(frozen=True)
class Fault:
    """One process fault, ``at_s`` seconds into the soak."""

    at_s: float
    kind: str


@dataclass(frozen=True)
class RateLimitPhase:
    """A window of the soak in which the emulator enforces a low create limit."""

    start_s: float
    end_s: float
    creates_per_minute: int
    burst: int
    #: The phase lasts until at least this many creates met the limit (the system may be too
    #: slow at the planned moment to ask for any), at most ``RateLimiter.EXTEND_S`` longer.
    min_creates: int = 1


@dataclass(frozen=True)
class Plan:
    """Everything the seed decides: users and their grants, the requests, the process faults."""

    grants: dict[str, int]
    requests: list[Request]
    faults: list[Fault]
    #: (seconds into the soak, index into ``requests``): regenerate that request's generation
    #: (a requeue with ``include_succeeded``, as a backfill does) if it has succeeded by then.
    regenerates: list[tuple[float, int]] = field(default_factory=list)
    rate_limit: RateLimitPhase | None = None


def _draw_request(
    rng: random.Random, config: ChaosConfig, index: int, user: str
) -> tuple[str, dict[str, Any]]:
    """A model of the mix and an input for it, its count field drawn from the lists above."""
    roll, model = rng.random(), MODEL_SHARES[-1][0]
    for candidate, share in MODEL_SHARES:
        if roll < share:
            model = candidate
            break
        roll -= share
    prompt = f"chaos {config.seed} request {index} for {user}"
    payload: dict[str, Any]
    if model in (MODEL, METERED_MODEL):
        payload = {"prompt": prompt, "seed": index, "width": 64, "height": 64}
        count = rng.choice(NUM_OUTPUTS)
        if count is not None:
            payload["num_outputs"] = count
    else:
        payload = {"prompt": prompt}
        tokens = rng.choice(MAX_TOKENS)
        if tokens is not None:
            payload["max_tokens"] = tokens
    return model, payload


def make_plan(config: ChaosConfig, prices: PriceBook) -> Plan:
    """The seeded schedule of a soak: the same seed gives the same load and the same faults.

    Requests arrive in waves (an application's traffic is bursty, and waves make batches): each
    request joins a wave at random. A poor user's requests all arrive in two waves, so they race
    each other for the same few credits. ``prices`` (the soak's price table) says what each
    request holds, which the grants are made of.
    """
    rng = random.Random(f"chaos:{config.seed}")
    window = config.arrival_window_s
    poor = [f"poor-{i}" for i in range(min(config.poor_users, config.users))]
    rich = [f"user-{i}" for i in range(config.users - len(poor))]
    everyone = rich + poor
    if not everyone:
        raise ValueError("the soak needs at least one user")
    # At least six waves, so that even a small soak has work in flight most of the window.
    waves = max(6, config.count // 12)
    wave_times = [round(window * (i + rng.uniform(0.0, 0.5)) / waves, 3) for i in range(waves)]
    # Poor users ask for about a tenth of the load each.
    poor_share = max(3, config.count // 10) if rich else config.count // max(1, len(poor))
    owners: list[str] = []
    for user in poor:
        owners.extend([user] * min(poor_share, config.count - len(owners)))
    while len(owners) < config.count:
        owners.append(rich[len(owners) % len(rich)] if rich else poor[0])
    rng.shuffle(owners)
    bursts = {user: rng.sample(wave_times, 2) for user in poor}
    requests: list[Request] = []
    for index, user in enumerate(owners):
        at = rng.choice(bursts[user]) if user in bursts else rng.choice(wave_times)
        model, payload = _draw_request(rng, config, index, user)
        roll = rng.random()
        earlier = [r for r in requests if r.model != EMPTY_MODEL]
        if user not in bursts and earlier and roll < IDENTICAL_SHARE:
            # The exact model and input of an earlier request (of anyone): only one of them may
            # adopt a prediction made for it.
            twin = rng.choice(earlier)
            model, payload = twin.model, dict(twin.input)
            at = max(at, twin.at_s)
        elif user not in bursts and roll < IDENTICAL_SHARE + EMPTY_SHARE:
            model = EMPTY_MODEL
            payload = {"prompt": payload["prompt"], "misbehave": rng.choice(EMPTY_KINDS)}
        requests.append(Request(at, user, payload, model))
    requests.sort(key=lambda r: r.at_s)
    # Regenerates: an operator (or a backfill) re-runs a succeeded generation, charged again;
    # late enough for it to have succeeded.
    candidates = [
        i for i, r in enumerate(requests) if r.user not in bursts and r.model != EMPTY_MODEL
    ]
    regenerates = sorted(
        (round(requests[i].at_s + 20 + rng.uniform(0, 10), 3), i)
        for i in rng.sample(
            candidates, k=min(len(candidates), round(config.count * REGENERATE_SHARE))
        )
    )

    def hold(request: Request) -> int:
        return prices.price_for(request.model).hold_amount(request.input)

    asked: Counter[str] = Counter()
    for request in [*requests, *(requests[i] for _, i in regenerates)]:
        asked[request.user] += hold(request)
    largest = max(hold(r) for r in requests)
    grants = {}
    for user in everyone:
        if user in poor:
            # Enough for about a third of what they ask (at least their largest request): the
            # rest must be refused.
            mine = max(hold(r) for r in requests if r.user == user)
            grants[user] = max(mine, asked[user] // 3)
        else:
            grants[user] = asked[user] + largest  # never short
    kinds = (
        ["kill_worker"] * config.worker_kills
        + ["pg_terminate"] * config.pg_terminations
        + ["daemon_restart", "s3_outage"]
    )
    rng.shuffle(kinds)
    # Spread over the arrival window, in a seeded order: after it, the last requests settle
    # within seconds and a fault would find nothing in flight to disturb.
    span = window
    faults = [
        Fault(round(span * (i + rng.uniform(0.2, 0.8)) / len(kinds), 3), kind)
        for i, kind in enumerate(kinds)
    ]
    # The rate-limited phase: a stretch of the middle of the arrival window, drawn last so that
    # it leaves the rest of the schedule as it was.
    phase = None
    if config.rate_limit > 0:
        length = max(10.0, window * rng.uniform(0.15, 0.25))
        start = window * rng.uniform(0.3, 0.5)
        phase = RateLimitPhase(
            round(start, 3),
            round(start + length, 3),
            config.rate_limit,
            config.rate_limit_burst,
            min_creates=max(5, config.count // 20),
        )
    return Plan(
        grants=grants,
        requests=requests,
        faults=faults,
        regenerates=regenerates,
        rate_limit=phase,
    )


# --- injecting process faults --------------------------------------------------------------


@dataclass
class FaultLog:
    """What the fault driver really did (counts by kind, and one line per event)."""

    counts: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    shortfalls: list[str] = field(default_factory=list)
    s3_outage_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, text: str, n: int = 1) -> None:
        with self.lock:
            self.counts[kind] += n
            self.events.append(text)


def live_workers(instance: Any, stack: ProvingStack) -> dict[str, int]:
    """Run id -> pid of every generation run whose worker is a live process of this stack."""
    from dagster import DagsterRunStatus, RunsFilter

    from ai_handler_dagster.runtime.launcher import process_alive, recorded_worker_pid

    runs = instance.get_runs(
        filters=RunsFilter(job_name="generation_job", statuses=[DagsterRunStatus.STARTED])
    )
    ours = set(stack.pids())
    found = {}
    for run in runs:
        pid = recorded_worker_pid(instance, run.run_id)
        # Only ever a process this stack started (the daemon's warm process forks the workers).
        if pid is not None and pid in ours and process_alive(pid):
            found[run.run_id] = pid
    return found


def _port_open(url: str) -> bool:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, int(port))) == 0


class FaultDriver(threading.Thread):
    """Injects the plan's process faults at their times (relative to ``started``)."""

    #: Longest wait for a run worker to kill before giving up on one scheduled kill.
    WORKER_WAIT_S = 120.0
    #: Least time between two faults, so that a late one does not land on top of the next.
    MIN_GAP_S = 4.0

    def __init__(
        self,
        plan: Plan,
        stack: ProvingStack,
        app_db_url: str,
        pg_admin_url: str,
        started: float,
        rng: random.Random,
        say: Callable[[str], None],
    ) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.plan = plan
        self.stack = stack
        self.app_db_url = app_db_url
        self.pg_admin_url = pg_admin_url
        self.started = started
        self.rng = rng
        self.say = say
        self.log = FaultLog()
        self.stop_event = threading.Event()
        #: Set once every request is in and has ended: there will be no more work to disturb.
        self.drained = threading.Event()
        self.error: BaseException | None = None
        self.killed: set[int] = set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> None:
        from dagster import DagsterInstance

        instance = DagsterInstance.from_config(str(self.stack.dagster_home))
        last = float("-inf")
        try:
            for fault in self.plan.faults:
                due = max(fault.at_s, last + self.MIN_GAP_S)
                if self.stop_event.wait(max(0.0, due - self.elapsed())):
                    return
                # A fault matters while there is work in flight: wait for some if none is.
                if not self._wait_for_work():
                    self.log.shortfalls.append(f"no work in flight for {fault.kind}")
                    continue
                getattr(self, f"_{fault.kind}")(instance)
                last = self.elapsed()
        except BaseException as exc:  # reported by the soak, never swallowed
            self.error = exc
        finally:
            instance.dispose()

    def _wait_for_work(self) -> bool:
        deadline = time.monotonic() + self.WORKER_WAIT_S
        engine = sa.create_engine(
            sa.make_url(self.app_db_url).update_query_dict({"application_name": APPLICATION_NAME}),
            poolclass=sa.pool.NullPool,
        )
        try:
            while not self.stop_event.is_set():
                with engine.connect() as conn:
                    busy = conn.execute(
                        sa.text(
                            "SELECT count(*) FROM generations WHERE status IN ('queued', 'running')"
                        )
                    ).scalar_one()
                if busy:
                    return True
                if time.monotonic() > deadline or self.drained.is_set():
                    return False
                time.sleep(0.5)
            return False
        finally:
            engine.dispose()

    def _kill_worker(self, instance: Any) -> None:
        deadline = time.monotonic() + self.WORKER_WAIT_S
        while not self.stop_event.is_set():
            workers = {
                run: pid
                for run, pid in live_workers(instance, self.stack).items()
                if pid not in self.killed
            }
            if workers:
                run_id = self.rng.choice(sorted(workers))
                pid = workers[run_id]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.add(pid)
                    self.log.record(
                        "worker_kill",
                        f"{self.elapsed():7.1f}s SIGKILL run worker {pid} of run {run_id[:8]}",
                    )
                    self.say(f"fault: SIGKILL run worker {pid} (run {run_id[:8]})")
                    return
            if time.monotonic() > deadline or self.drained.is_set():
                self.log.shortfalls.append("no live run worker to kill")
                return
            time.sleep(0.5)

    def _daemon_restart(self, instance: Any) -> None:
        from dagster import DagsterRunStatus, RunsFilter

        # Prefer a moment when runs are executing and none is still starting. A worker killed
        # while its run is STARTING is only noticed after run monitoring's start timeout
        # (120 s): correct, but it would make every soak that hits it two minutes longer.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.stop_event.is_set():
            runs = instance.get_runs(
                filters=RunsFilter(
                    job_name="generation_job",
                    statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED],
                )
            )
            statuses = {run.status for run in runs}
            if DagsterRunStatus.STARTED in statuses and DagsterRunStatus.STARTING not in statuses:
                break
            time.sleep(0.25)
        workers = live_workers(instance, self.stack)
        self.stack.restart_daemon()
        self.log.record(
            "daemon_restart",
            f"{self.elapsed():7.1f}s killed and restarted dagster-daemon "
            f"({len(workers)} run workers with it)",
        )
        self.log.counts["daemon_restart_workers"] += len(workers)
        self.say(f"fault: dagster-daemon killed and restarted ({len(workers)} run workers too)")

    def _s3_outage(self, instance: Any) -> None:
        proc = self.stack.processes["s3"]
        began = time.monotonic()
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = began + 60
        while _port_open(self.stack.s3_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _port_open(self.stack.s3_url):
            self.log.shortfalls.append("the S3 endpoint never went offline")
            return
        while not _port_open(self.stack.s3_url):
            if time.monotonic() > deadline:
                raise RuntimeError("the S3 endpoint did not come back within 60 s")
            time.sleep(0.1)
        took = time.monotonic() - began
        self.log.s3_outage_s.append(took)
        self.log.record("s3_outage", f"{self.elapsed():7.1f}s S3 endpoint offline for {took:.1f}s")
        self.say(f"fault: S3 endpoint offline for {took:.1f}s (objects kept)")

    def _pg_terminate(self, instance: Any) -> None:
        name = sa.make_url(self.app_db_url).database
        engine = sa.create_engine(
            self.pg_admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        killed = 0
        try:
            # Connections come and go with runs; a round that finds none is tried again shortly.
            deadline = time.monotonic() + 30
            while not killed and time.monotonic() < deadline and not self.stop_event.is_set():
                with engine.connect() as conn:
                    killed = int(
                        conn.execute(
                            sa.text(
                                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                "FROM pg_stat_activity "
                                "WHERE datname = :name AND pid <> pg_backend_pid() "
                                "AND application_name <> :ours"
                            ),
                            {"name": name, "ours": APPLICATION_NAME},
                        ).scalar_one()
                    )
                if not killed:
                    time.sleep(0.5)
        finally:
            engine.dispose()
        if not killed:
            self.log.shortfalls.append("pg_terminate_backend found no app DB connection")
            return
        self.log.record(
            "pg_terminate",
            f"{self.elapsed():7.1f}s pg_terminate_backend: {killed} app DB connections",
        )
        self.log.counts["pg_backends_terminated"] += killed
        self.say(f"fault: terminated {killed} app database connections")


class RateLimiter(threading.Thread):
    """Runs the plan's rate-limited phase: at its start the emulator enforces a low create
    limit (through its control API, as a provider lowers an account's limit), at its end the
    limits go back to what they were. Every 429 it causes carries ``Retry-After`` and the
    ``ratelimit-*`` headers.

    The phase is about creates, so it is tied to them as well as to the clock: it begins at its
    planned time once creates are being asked for (a daemon restart or a loaded machine may
    leave none in flight then), and lasts its planned length and until ``min_creates`` create
    requests met the limit, at most ``EXTEND_S`` longer."""

    #: Longest wait for a first create after the planned start, and longest extension.
    WAIT_S = 120.0
    EXTEND_S = 120.0

    def __init__(
        self,
        phase: RateLimitPhase,
        emulator_url: str,
        started: float,
        say: Callable[[str], None],
    ) -> None:
        super().__init__(name="chaos-rate-limit", daemon=True)
        self.phase = phase
        self.emulator_url = emulator_url
        self.started = started
        self.say = say
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        #: Seconds into the soak when the limit was switched on and off.
        self.began_s: float | None = None
        self.ended_s: float | None = None
        #: Create requests the emulator answered during the phase, and requests it refused
        #: for the enforced limit.
        self.creates = 0
        self.throttled = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> None:
        try:
            if self.stop_event.wait(max(0.0, self.phase.start_s - self.elapsed())):
                return
            with EmulatorControl(self.emulator_url) as control:
                before = control.config()
                baseline = _creates(control.stats())
                deadline = time.monotonic() + self.WAIT_S
                while _creates(control.stats()) == baseline and time.monotonic() < deadline:
                    if self.stop_event.wait(0.25):
                        return
                first = control.stats()
                control.configure(
                    rate_limit=True,
                    creates_per_minute=self.phase.creates_per_minute,
                    creates_burst=self.phase.burst,
                )
                self.began_s = self.elapsed()
                length = self.phase.end_s - self.phase.start_s
                self.say(
                    f"rate limit: {self.phase.creates_per_minute} creates/min, burst "
                    f"{self.phase.burst}, for {length:.0f}s and {self.phase.min_creates} creates"
                )
                try:
                    ends = time.monotonic() + length
                    latest = ends + self.EXTEND_S
                    while not self.stop_event.wait(0.5):
                        now = time.monotonic()
                        met = _creates(control.stats()) - _creates(first)
                        if now >= latest or (now >= ends and met >= self.phase.min_creates):
                            break
                finally:
                    # Back to the budget the emulator had (a minute's worth when it had none).
                    control.configure(
                        rate_limit=before["rate_limit"],
                        creates_per_minute=before["creates_per_minute"],
                        creates_burst=before["creates_burst"] or before["creates_per_minute"],
                    )
                    self.ended_s = self.elapsed()
                    last = control.stats()
                    self.creates = _creates(last) - _creates(first)
                    self.throttled = int(last["rate_limited"]) - int(first["rate_limited"])
                    self.say(
                        f"rate limit lifted: {self.throttled} requests throttled of "
                        f"{self.creates} creates in {self.ended_s - self.began_s:.0f}s"
                    )
        except BaseException as exc:  # reported by the soak, never swallowed
            self.error = exc


def _creates(stats: dict[str, Any]) -> int:
    requests = stats.get("requests", {})
    return sum(int(requests.get(route, 0)) for route in CREATE_ROUTES)


# --- the application's side ----------------------------------------------------------------


def _grant(engine: sa.Engine, grants: dict[str, int], seed: int) -> None:
    from ai_handler_dagster import ledger
    from ai_handler_dagster.db.engine import session_scope

    with session_scope(engine) as session:
        for user, amount in grants.items():
            ledger.grant(session, user, amount, key=f"chaos:{seed}:{user}")


class Submitter(threading.Thread):
    """Inserts the plan's requests at their times with plain SQL, as an application would, and
    regenerates succeeded generations at theirs, as an operator's backfill would."""

    def __init__(self, plan: Plan, engine: sa.Engine, started: float) -> None:
        super().__init__(name="chaos-submit", daemon=True)
        self.plan = plan
        self.engine = engine
        self.started = started
        #: Generation ids, in the order of ``plan.requests``.
        self.ids: list[int] = []
        self.regenerated: list[int] = []
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        actions = sorted(
            [(r.at_s, 0, i) for i, r in enumerate(self.plan.requests)]
            + [(at, 1, i) for at, i in self.plan.regenerates]
        )
        try:
            position = 0
            while position < len(actions):
                due = actions[position][0] - (time.monotonic() - self.started)
                if self.stop_event.wait(max(0.0, due)):
                    return
                now = time.monotonic() - self.started
                batch = []
                while position < len(actions) and actions[position][0] <= now:
                    batch.append(actions[position])
                    position += 1
                inserts = [self.plan.requests[i] for _, kind, i in batch if kind == 0]
                if inserts:
                    self.ids.extend(self._retrying(functools.partial(self._insert, inserts)))
                for _, kind, index in batch:
                    if kind == 1:
                        self._retrying(functools.partial(self._regenerate, index))
        except BaseException as exc:
            self.error = exc

    def _insert(self, batch: list[Request]) -> list[int]:
        insert = sa.text(
            "INSERT INTO generations (user_id, model, input, status) "
            "VALUES (:user, :model, :input, 'pending') RETURNING id"
        )
        with self.engine.begin() as conn:
            return [
                int(
                    conn.execute(
                        insert, {"user": r.user, "model": r.model, "input": json.dumps(r.input)}
                    ).scalar_one()
                )
                for r in batch
            ]

    def _regenerate(self, index: int) -> None:
        from ai_handler_dagster import generations as gens
        from ai_handler_dagster.db.engine import session_scope

        if index >= len(self.ids):
            return
        gid = self.ids[index]
        with session_scope(self.engine) as session:
            if gens.get(session, gid).status == GenerationStatus.SUCCEEDED:
                gens.requeue(session, gid, include_succeeded=True)
                self.regenerated.append(gid)

    def _retrying(self, action: Callable[[], Any]) -> Any:
        # The soak terminates database connections on purpose: try again.
        policy = retries.retrying(attempts=5, base_s=0.2, retry_on=sa.exc.OperationalError)
        return policy(action)


# --- the soak ------------------------------------------------------------------------------


def _stack_config(config: ChaosConfig, state: Path, app_url: str, dagster_url: str) -> StackConfig:
    # The emulator starts without faults (the stack's own start-up calls, such as fetching the
    # webhook secret, are not part of the soak); _soak turns them on once the stack is up.
    emulator_args = ["--latency-jitter", "0.3", "--retry-after", "1", "--seed", str(config.seed)]
    state.mkdir(parents=True, exist_ok=True)
    prices = state / "prices.toml"
    prices.write_text(price_table())
    return StackConfig(
        state_dir=state,
        storage="postgres",
        dagster_pg_url=dagster_url,
        app_db_url=app_url,
        latency_s=config.latency,
        concurrency=config.concurrency,
        emulator_args=emulator_args,
        extra_env={
            "AI_HANDLER_SENSOR_INTERVAL_S": "1",
            # Stuck predictions must end: the await step cancels them and refunds.
            "AI_HANDLER_PREDICTION_DEADLINE_S": str(config.deadline_s),
            "AI_HANDLER_MAX_BATCH": str(config.max_batch),
            # Batches from the first request on: fewer runs, each costs seconds to start.
            "AI_HANDLER_SMALL_BACKLOG": "0",
            "AI_HANDLER_MAX_IN_FLIGHT": "96",
            "AI_HANDLER_MAX_IN_FLIGHT_PER_USER": "48",
            "AI_HANDLER_DB_POOL_MAX": "8",
            # The shipped prices, a metered and a fixed version, and the test model whose
            # outputs come back empty.
            "AI_HANDLER_PRICING_FILE": str(prices),
        },
    )


def price_table() -> str:
    """The soak's price table: the shipped one and ``SOAK_PRICES`` (a metered and a fixed
    version, and the empty-output test model), so that every kind of price is in the mix."""
    from ai_handler_dagster.pricing import DEFAULT_PRICING_RESOURCE

    shipped = resources.files("ai_handler_dagster").joinpath(DEFAULT_PRICING_RESOURCE)
    return shipped.read_text(encoding="utf-8") + SOAK_PRICES


def soak_prices() -> PriceBook:
    """``price_table()`` parsed."""
    from ai_handler_dagster.pricing import parse_pricing

    return parse_pricing(price_table(), source="the soak's price table")


def _statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM generations GROUP BY status"))
        return {status: int(n) for status, n in rows}


def _wait_for_sensor(stack: Stack, timeout_s: float) -> None:
    """Block until the request sensor has ticked once: the daemon runs and its code loaded."""
    from dagster import DagsterInstance

    from ai_handler_dagster.runtime.ticks import sensor_has_ticked

    instance = DagsterInstance.from_config(str(stack.dagster_home))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if sensor_has_ticked(instance, "generation_request_sensor"):
                return
            time.sleep(0.5)
    finally:
        instance.dispose()
    raise TimeoutError(f"the request sensor did not tick within {timeout_s:.0f}s")


def _runs_in_progress(stack: Stack) -> int:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    instance = DagsterInstance.from_config(str(stack.dagster_home))
    try:
        return len(
            instance.get_runs(
                filters=RunsFilter(
                    statuses=[
                        DagsterRunStatus.QUEUED,
                        DagsterRunStatus.NOT_STARTED,
                        DagsterRunStatus.STARTING,
                        DagsterRunStatus.STARTED,
                        DagsterRunStatus.CANCELING,
                    ]
                )
            )
        )
    finally:
        instance.dispose()


def launch_reconcile(stack: Stack) -> None:
    """Queue ``reconcile_job`` on the stack's instance (the daemon launches it), now rather
    than at the schedule's next five-minute mark."""
    dagster = Path(sys.executable).with_name("dagster")
    subprocess.run(
        [
            str(dagster) if dagster.exists() else "dagster",
            "job",
            "launch",
            "-w",
            str(WORKSPACE_FILE),
            "-j",
            "reconcile_job",
        ],
        env=stack.env(),
        cwd=str(stack.config.state_dir),
        check=True,
        capture_output=True,
        timeout=180,
    )


def _fetcher() -> tuple[httpx.Client, Callable[[str], bytes | None]]:
    client = httpx.Client(timeout=15, trust_env=False)

    def fetch_once(url: str) -> bytes | None:
        response = client.get(url)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=response.request, response=response
            )
        return response.content

    def fetch(url: str) -> bytes | None:
        """The object's bytes, None if it is gone (404) or still unreadable after 3 tries."""
        try:
            return retries.retrying(attempts=3, base_s=0.2, retry_on=httpx.HTTPError)(
                fetch_once, url
            )
        except httpx.HTTPError:
            return None

    return client, fetch


def run_chaos(config: ChaosConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one soak on fresh databases and a fresh stack; return its report."""
    state = Path(tempfile.mkdtemp(prefix="ai-handler-chaos-"))
    report: dict[str, Any] | None = None
    try:
        with scratch_databases(config.pg_admin_url, "aih_chaos", keep=config.keep) as urls:
            app_url, dagster_url = urls
            stack = ProvingStack(_stack_config(config, state, app_url, dagster_url))
            with stack:
                report = _soak(config, stack, app_url, progress)
            return report
    finally:
        if report is not None and report["violations"] == 0 and not config.keep:
            shutil.rmtree(state, ignore_errors=True)
        elif progress:
            sys.stderr.write(f"chaos: stack state and logs kept in {state}\n")


def _soak(config: ChaosConfig, stack: ProvingStack, app_url: str, progress: bool) -> dict[str, Any]:
    from ai_handler_dagster.db.engine import make_engine
    from ai_handler_dagster.pricing import load_pricing

    def say(text: str) -> None:
        if progress:
            sys.stderr.write(f"[chaos {time.monotonic() - begun:6.1f}s] {text}\n")
            sys.stderr.flush()

    begun = time.monotonic()
    # The price table the stack runs with: the grants are made of its holds, and the audit
    # checks every hold and charge against it.
    prices = load_pricing(stack.config.extra_env["AI_HANDLER_PRICING_FILE"])
    plan = make_plan(config, prices)
    engine = make_engine(
        sa.make_url(app_url).update_query_dict({"application_name": APPLICATION_NAME})
    )
    _grant(engine, plan.grants, config.seed)
    overrides = stack.overrides()
    say(f"overrides of production's settings: {json.dumps(overrides)}")
    say("stack up; waiting for the daemon's first sensor tick")
    _wait_for_sensor(stack, timeout_s=180)
    say(
        f"daemon ready; {config.count} requests from {len(plan.grants)} users over "
        f"{config.arrival_window_s:.0f}s; {len(plan.faults)} process faults scheduled"
    )

    with EmulatorControl(stack.emulator_url) as control:
        control.configure(
            faults=dict(EMULATOR_FAULTS),
            model_aliases={MODEL: MODEL_ALIAS},
            official_models=[MODEL],
        )
    started = time.monotonic()
    submitter = Submitter(plan, engine, started)
    driver = FaultDriver(
        plan,
        stack,
        app_url,
        config.pg_admin_url,
        started,
        random.Random(f"chaos-victims:{config.seed}"),
        say,
    )
    limiter = (
        RateLimiter(plan.rate_limit, stack.emulator_url, started, say) if plan.rate_limit else None
    )
    submitter.start()
    driver.start()
    if limiter is not None:
        limiter.start()
    try:
        _settle(config, stack, engine, submitter, driver, started, say)
    finally:
        submitter.stop_event.set()
        driver.stop_event.set()
        submitter.join(timeout=30)
        driver.join(timeout=120)
        if limiter is not None:
            # The phase ends within the arrival window, which is over once the soak settled; a
            # soak stopped early ends it now.
            limiter.stop_event.set()
            limiter.join(timeout=60)
    duration = time.monotonic() - started
    threads: list[Submitter | FaultDriver | RateLimiter] = [submitter, driver]
    if limiter is not None:
        threads.append(limiter)
    for thread in threads:
        if thread.error is not None:
            raise RuntimeError(f"{thread.name} failed: {thread.error!r}") from thread.error

    # Quiet the emulator before the audit reads its files, and wait for the last runs to end.
    deadline = time.monotonic() + 60
    while _runs_in_progress(stack) and time.monotonic() < deadline:
        time.sleep(1)
    with EmulatorControl(stack.emulator_url) as control:
        stats = control.stats()
        control.configure(faults={name: 0.0 for name in EMULATOR_FAULTS})
        predictions = control.predictions()
    say("settled; auditing")
    s3 = stack.s3_client()
    http, fetch = _fetcher()
    try:
        result = audit.audit(
            engine,
            predictions=predictions,
            s3_objects=audit.list_s3_objects(s3, DEFAULT_BUCKET),
            fetch_output=fetch,
            prices=prices,
        )
    finally:
        http.close()
    mix = {
        "identical_inputs": len(plan.requests)
        - len({json.dumps(r.input, sort_keys=True) for r in plan.requests}),
        "empty_outputs": sum(1 for r in plan.requests if r.model == EMPTY_MODEL),
        "regenerates_planned": len(plan.regenerates),
        "regenerated": len(submitter.regenerated),
        "aliased_model": f"{MODEL} -> {MODEL_ALIAS}",
        **mix_counts(plan, prices),
    }
    report = _report(config, plan, driver.log, stats, result, duration, limiter)
    return {**report, "mix": mix, "overrides": overrides}


def mix_counts(plan: Plan, prices: PriceBook) -> dict[str, dict[str, int]]:
    """Requests by price kind, and the counts asked for by the counted kinds' input fields
    (``default`` when the field is left out)."""
    kinds: Counter[str] = Counter()
    outputs: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for request in plan.requests:
        kinds[prices.price_for(request.model).kind] += 1
        if request.model in (MODEL, METERED_MODEL):
            outputs[str(request.input.get("num_outputs", "default"))] += 1
        elif request.model in (TEXT_MODEL, FIXED_MODEL):
            tokens[str(request.input.get("max_tokens", "default"))] += 1
    return {
        "price_kinds": dict(sorted(kinds.items())),
        "num_outputs": dict(sorted(outputs.items())),
        "max_tokens": dict(sorted(tokens.items(), key=lambda kv: (len(kv[0]), kv[0]))),
    }


def _settle(
    config: ChaosConfig,
    stack: Stack,
    engine: sa.Engine,
    submitter: Submitter,
    driver: FaultDriver,
    started: float,
    say: Callable[[str], None],
) -> None:
    """Wait until every request is in and has ended, and the fault driver is done.

    Generations normally end through their runs and the refund sensors. When nothing moves for a
    while, reconciliation is launched at once instead of waiting for its schedule.
    """
    deadline = started + config.timeout_s
    last_line, last_change, last_done = "", time.monotonic(), -1
    reconcile_at = 0.0
    while True:
        counts = _statuses(engine)
        done = sum(counts.get(s, 0) for s in TERMINAL)
        inserted = sum(counts.values())
        line = (
            f"{inserted}/{config.count} in, {done} ended ("
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + ")"
        )
        if line != last_line:
            say(line)
            last_line = line
        if done != last_done:
            last_done, last_change = done, time.monotonic()
        if inserted >= config.count and done >= config.count and not submitter.is_alive():
            driver.drained.set()
            if not driver.is_alive():
                return
        if submitter.error is not None or driver.error is not None:
            return
        now = time.monotonic()
        stalled = now - last_change > 60 and inserted >= config.count and done < inserted
        if stalled and now > reconcile_at:
            say("no progress for 60 s: launching reconcile_job")
            try:
                launch_reconcile(stack)
            except (subprocess.SubprocessError, OSError) as exc:
                say(f"could not launch reconcile_job: {exc}")
            reconcile_at = now + 90
        if now > deadline:
            raise TimeoutError(
                f"the soak did not settle within {config.timeout_s:.0f}s: {line}; "
                f"logs in {stack.logs_dir}"
            )
        time.sleep(1)


# --- the report ----------------------------------------------------------------------------


def _emulator_faults(stats: dict[str, Any]) -> dict[str, int]:
    applied = stats.get("faults_applied", {})
    return {
        "model_failure": int(applied.get("failure", 0)),
        "http_500": int(applied.get("http_500", 0)),
        "http_429": int(applied.get("http_429", 0)),
        "create_dropped": int(stats.get("create_responses_dropped", 0)),
        "stuck": int(applied.get("stuck", 0)),
        "output_removed": int(applied.get("remove_output", 0)),
    }


def _report(
    config: ChaosConfig,
    plan: Plan,
    log: FaultLog,
    stats: dict[str, Any],
    result: audit.AuditReport,
    duration: float,
    limiter: RateLimiter | None = None,
) -> dict[str, Any]:
    faults = _emulator_faults(stats)
    for kind in (
        "worker_kill",
        "daemon_restart",
        "daemon_restart_workers",
        "s3_outage",
        "pg_terminate",
        "pg_backends_terminated",
    ):
        faults[kind] = int(log.counts.get(kind, 0))
    shortfalls = list(log.shortfalls)
    if faults["worker_kill"] < config.worker_kills:
        shortfalls.append(
            f"{faults['worker_kill']} of {config.worker_kills} run worker kills landed"
        )
    if faults["pg_terminate"] < config.pg_terminations:
        shortfalls.append(
            f"{faults['pg_terminate']} of {config.pg_terminations} connection terminations ran"
        )
    for kind in ("daemon_restart", "s3_outage"):
        if faults[kind] < 1:
            shortfalls.append(f"no {kind.replace('_', ' ')} happened")
    phase: dict[str, Any] | None = None
    if plan.rate_limit is not None:
        ran = limiter is not None and limiter.began_s is not None
        phase = {
            "creates_per_minute": plan.rate_limit.creates_per_minute,
            "burst": plan.rate_limit.burst,
            "planned_s": [plan.rate_limit.start_s, plan.rate_limit.end_s],
            "window_s": [
                round(limiter.began_s, 1) if limiter and limiter.began_s is not None else None,
                round(limiter.ended_s, 1) if limiter and limiter.ended_s is not None else None,
            ],
            "creates": limiter.creates if limiter else 0,
            "throttled": limiter.throttled if limiter else 0,
            "failed_rate_limited": result.failed_by_code.get("rate_limited", 0),
            "failed_queue_deadline": result.failed_before_create,
        }
        if not ran:
            shortfalls.append("the rate-limited phase never began")
        elif not phase["creates"]:
            shortfalls.append("no create reached the emulator during the rate-limited phase")
    statuses = result.statuses
    failed = sum(statuses.get(s, 0) for s in UNSUCCESSFUL)
    return {
        "seed": config.seed,
        "count": config.count,
        "users": len(plan.grants),
        "poor_users": sum(1 for u in plan.grants if u.startswith("poor-")),
        "duration_s": round(duration, 1),
        "faults": faults,
        "fault_events": list(log.events),
        "s3_outage_s": [round(s, 1) for s in log.s3_outage_s],
        "succeeded": statuses.get(GenerationStatus.SUCCEEDED, 0),
        "failed": failed,
        "failed_by_code": result.failed_by_code,
        "refunded": result.refunded,
        "credits_granted": result.granted_credits,
        "credits_captured": result.captured_credits,
        "predictions": result.predictions,
        "paid_predictions": result.paid_predictions,
        "canceled_orphans": result.canceled_orphans,
        "unrecorded_predictions": result.unrecorded_predictions,
        "objects_checked": result.objects_checked,
        "objects_compared_with_emulator": result.objects_compared_with_emulator,
        "rate_limit_phase": phase,
        "rate_limited_total": int(stats.get("rate_limited", 0)),
        "price_checks": {
            kind: {name: int(tally.get(name, 0)) for name in PRICE_TALLIES}
            for kind, tally in sorted(result.price_checks.items())
        },
        "unverified_output_counts": result.unverified_output_counts,
        "checks": result.by_check(),
        "fault_shortfalls": shortfalls,
        "violations": len(result.violations) + len(shortfalls),
        "violation_details": [str(v) for v in result.violations[:100]],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a table for people."""
    lines = [
        f"chaos soak: seed {report['seed']}",
        "",
        "load",
        f"  {'generations':44}{report['count']:>8}",
        f"  {'users (on small balances)':44}{report['users']:>5} ({report['poor_users']})",
        f"  {'duration (s)':44}{report['duration_s']:>8}",
    ]
    mix = report.get("mix") or {}
    if mix:
        lines += [
            f"  {'repeats of an earlier input':44}{mix['identical_inputs']:>8}",
            f"  {'empty outputs asked for':44}{mix['empty_outputs']:>8}",
            f"  {'regenerates (planned)':44}{mix['regenerated']:>5} ({mix['regenerates_planned']})",
            f"  {'official model answered under':44}{mix['aliased_model']}",
        ]
        for kind, n in (mix.get("price_kinds") or {}).items():
            lines.append(f"  {'requests priced ' + kind:44}{n:>8}")
        for name in ("num_outputs", "max_tokens"):
            asked = mix.get(name) or {}
            if asked:
                text = ", ".join(f"{k}: {v}" for k, v in asked.items())
                lines.append(f"  {'  ' + name + ' asked for':44}{text}")
    lines += [
        "",
        "settings that differ from production's",
    ]
    for scope, values in report.get("overrides", {}).items():
        for key, value in values.items():
            lines.append(f"  {scope + ': ' + key:44}{json.dumps(value):>8}")
    lines += ["", "faults injected"]
    for kind, label in FAULT_LABELS.items():
        lines.append(f"  {label:44}{report['faults'].get(kind, 0):>8}")
    if report["s3_outage_s"]:
        lines.append(f"  {'  S3 offline (s)':44}{', '.join(map(str, report['s3_outage_s'])):>8}")
    phase = report.get("rate_limit_phase")
    if phase:
        began, ended = phase["window_s"]
        lines += [
            f"  {'rate-limited phase (creates/min, burst)':44}"
            f"{phase['creates_per_minute']:>5} ({phase['burst']})",
            f"  {'  from, to (s into the soak)':44}{began}, {ended}",
            f"  {'  creates answered during it':44}{phase['creates']:>8}",
            f"  {'  requests throttled by the limit (429)':44}{phase['throttled']:>8}",
        ]
    throttled = report.get("rate_limited_total", 0)
    lines.append(f"  {'requests throttled by a limit, whole soak':44}{throttled:>8}")
    lines += ["", "outcomes", f"  {'succeeded':44}{report['succeeded']:>8}"]
    lines.append(f"  {'failed or canceled':44}{report['failed']:>8}")
    for code, n in report["failed_by_code"].items():
        lines.append(f"    {code:42}{n:>8}")
    lines += [
        f"  {'refunded (holds released or expired)':44}{report['refunded']:>8}",
        f"  {'credits granted':44}{report['credits_granted']:>8}",
        f"  {'credits captured':44}{report['credits_captured']:>8}",
        f"  {'predictions on the emulator (paid)':44}"
        f"{report['predictions']:>5} ({report['paid_predictions']})",
        f"  {'unowned predictions, canceled':44}{report['canceled_orphans']:>8}",
        f"  {'unowned predictions of a request, ran on':44}{report['unrecorded_predictions']:>8}",
        f"  {'S3 objects checked (vs emulator bytes)':44}"
        f"{report['objects_checked']:>5} ({report['objects_compared_with_emulator']})",
    ]
    if phase:
        lines += [
            f"  {'failed with rate_limited':44}{phase['failed_rate_limited']:>8}",
            f"  {'failed at the queue deadline, no create':44}{phase['failed_queue_deadline']:>8}",
        ]
    price_checks = report.get("price_checks") or {}
    if price_checks:
        lines += ["", "prices checked against the table and the provider's counts"]
        lines.append(f"  {'kind':20}{'holds':>8}{'charges':>9}{'unpaid':>8}{'mismatches':>12}")
        for kind, tally in price_checks.items():
            lines.append(
                f"  {kind:20}{tally['holds']:>8}{tally['charges']:>9}{tally['unpaid']:>8}"
                f"{tally['mismatches']:>12}"
            )
        lines.append(
            f"  {'output counts unverified':44}{report.get('unverified_output_counts', 0):>8}"
        )
        lines.append("  (unpaid: failed or canceled attempts, checked to capture nothing)")
    lines += ["", "invariants"]
    for name, description in audit.CHECKS.items():
        n = report["checks"].get(name, 0)
        verdict = "ok" if n == 0 else f"{n} VIOLATION(S)"
        lines.append(f"  {description:70} {verdict}")
    for shortfall in report["fault_shortfalls"]:
        lines.append(f"  fault schedule not met: {shortfall}")
    for detail in report["violation_details"]:
        lines.append(f"  - {detail}")
    lines += ["", f"violations: {report['violations']}"]
    return "\n".join(lines)


def cmd_chaos(args: argparse.Namespace) -> int:
    """Run the soak; print the table (and one JSON object with ``--json``)."""
    config = ChaosConfig(
        seed=args.seed,
        count=args.count,
        users=args.users,
        latency=args.latency,
        concurrency=args.concurrency,
        deadline_s=args.deadline,
        worker_kills=args.worker_kills,
        window_s=args.window,
        timeout_s=args.timeout,
        pg_admin_url=args.pg_url,
        keep=args.keep,
        rate_limit=args.rate_limit,
        rate_limit_burst=args.rate_limit_burst,
    )
    try:
        report = run_chaos(config, progress=not args.quiet)
    except (TimeoutError, RuntimeError) as exc:
        # The soak could not finish (nothing settled, a fault could not be injected): no audit.
        sys.stderr.write(f"error: chaos soak did not complete: {exc}\n")
        return 1
    sys.stdout.write(format_table(report) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    return 0 if report["violations"] == 0 else 1


def register(sub: Any) -> None:
    """Add ``chaos`` to the CLI."""
    p = sub.add_parser("chaos", help="seeded soak with faults through the real stack, then audit")
    p.add_argument("--seed", type=int, default=1, help="seed of the load and fault schedule")
    p.add_argument("--count", type=int, default=300, help="generations (default 300)")
    p.add_argument("--users", type=int, default=6, help="users, two of them on small balances")
    p.add_argument("--latency", type=float, default=1.0, help="model seconds (default 1)")
    p.add_argument("--concurrency", type=int, default=16, help="provider slots (default 16)")
    p.add_argument(
        "--deadline", type=int, default=20, help="prediction deadline in seconds (default 20)"
    )
    p.add_argument("--worker-kills", type=int, default=5, help="run workers to SIGKILL")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=20,
        help="creates a minute the emulator enforces in the rate-limited phase (0: no phase)",
    )
    p.add_argument(
        "--rate-limit-burst", type=int, default=2, help="burst of that limit (default 2)"
    )
    p.add_argument("--window", type=float, default=None, help="seconds over which requests arrive")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to settle (default 1800)")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server for the databases")
    p.add_argument("--keep", action="store_true", help="keep the databases and the state folder")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=cmd_chaos)
