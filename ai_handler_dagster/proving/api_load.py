"""``ai-handler bench --api-load``: submits per second and their latency through the HTTP API.

The service runs as production runs it: ``ai-handler serve`` with ``--api-workers`` processes
on a scratch PostgreSQL database, the shipped price table, one key. A load generator (asyncio
and aiohttp, in this process, so it shares the machine with the server) keeps at most
``--clients`` requests in flight, sending as fast as they are answered or, with ``--rate R``,
R requests a second (open loop: latency counts from when a request was due):

1. ``GET /healthz`` for ``--health-count`` requests: the same server's floor (framework and
   network, no database), measured in the same run so the submit figures read as a ratio on a
   noisy machine;
2. ``POST /v1/generations`` for ``--count`` requests spread over ``--users`` users, each with
   plenty of credits, so every submit holds credits, writes its generation and its event;
3. ``GET /healthz`` again (the floor after the load).

Then the audit: every accepted id exists exactly once, pending with a pending hold of its price,
no generation exists that was not accepted, and the ledger verifies.

With ``--pipeline`` the whole stack runs meanwhile on the same database (daemon, runs, the
emulator with ``--latency`` and ``--concurrency``, S3, the stack's own service taking the
provider's webhooks), so the submits share the machine with the work they cause. The audit then
waits for every accepted generation to end and requires each to have succeeded, with no hold
left pending, and the ledger to verify. Targets (issue 13): at least
300 submits a second with p99 under 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import sqlalchemy as sa

from ai_handler_dagster import db, generations, ledger
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation, Hold
from ai_handler_dagster.devstack.pg import drop_database, new_database
from ai_handler_dagster.domain import TERMINAL, GenerationStatus, HoldStatus

#: The model every submit asks for, and its input (the shipped table holds 5 credits).
MODEL = "demo/pixel-sketch"
INPUT = {"prompt": "a lighthouse at dusk"}


@dataclass
class LoadConfig:
    pg_admin_url: str
    count: int = 6000
    clients: int = 32
    users: int = 100
    api_workers: int = 2
    health_count: int = 3000
    #: Requests a second, open loop (None: as fast as ``clients`` in flight allow).
    rate: float | None = None
    progress: bool = True
    #: Run the whole pipeline meanwhile (daemon, runs, emulator, S3) and wait for every
    #: accepted generation to end; the emulator's model latency and concurrency.
    pipeline: bool = False
    latency: float = 1.0
    concurrency: int = 64
    settle_timeout_s: float = 1800.0


@dataclass
class Phase:
    """What one phase measured: answers by status, wall time and each request's latency."""

    name: str
    statuses: dict[int, int]
    wall_s: float
    latencies_s: list[float]
    ids: list[int]

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)

        def pct(p: float) -> float:
            return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

        return {
            "requests": len(ordered),
            "per_s": round(len(ordered) / self.wall_s, 1),
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(1000 * ordered[-1], 2),
            "mean_ms": round(1000 * statistics.fmean(ordered), 2),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


async def _drive(
    url: str,
    key: str,
    name: str,
    count: int,
    clients: int,
    request: Any,
    rate: float | None = None,
) -> Phase:
    """Send ``count`` requests with at most ``clients`` in flight: as fast as they answer, or
    (with ``rate``) one every ``1 / rate`` seconds, open loop. Open loop, a request's latency
    counts from when it was due, so a server that falls behind shows it (no coordinated
    omission)."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    ids: list[int] = []
    next_index = 0
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        url, headers=headers, connector=connector, timeout=timeout
    ) as client:
        began = time.perf_counter()

        async def one(index: int, due: float) -> None:
            async with request(client, index) as answer:
                body = await answer.read()
            latencies.append(time.perf_counter() - due)
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            if answer.status == 202:
                ids.append(int(json.loads(body)["id"]))

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                if rate is None:
                    await one(index, time.perf_counter())
                    continue
                due = began + index / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                await one(index, due)

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - began
    return Phase(name, statuses, wall, latencies, ids)


def _health(client: aiohttp.ClientSession, _index: int) -> Any:
    return client.get("/healthz")


def _submitter(users: int) -> Any:
    def submit(client: aiohttp.ClientSession, index: int) -> Any:
        body = {"user": f"load-{index % users:03d}", "model": MODEL, "input": INPUT}
        return client.post("/v1/generations", json=body)

    return submit


def _audit(engine: sa.Engine, accepted: list[int], hold_per_generation: int) -> dict[str, Any]:
    with session_scope(engine) as session:
        total = int(session.scalar(sa.select(sa.func.count()).select_from(Generation)) or 0)
        rows = session.execute(
            sa.select(Generation.id, Generation.status, Hold.status, Hold.amount).join(
                Hold, Hold.id == Generation.hold_id, isouter=True
            )
        ).all()
        violations = [*ledger.verify(session), *generations.verify(session)]
    found = {r[0]: r for r in rows}
    missing = [i for i in accepted if i not in found]
    unheld = [
        i
        for i in accepted
        if i in found
        and not (
            found[i][1] == GenerationStatus.PENDING
            and found[i][2] == HoldStatus.PENDING
            and found[i][3] == hold_per_generation
        )
    ]
    return {
        "accepted": len(accepted),
        "accepted_distinct": len(set(accepted)),
        "generations": total,
        "missing": len(missing),
        "without_their_hold": len(unheld),
        "not_accepted_but_written": total - len(set(accepted) & set(found)),
        "ledger_violations": len(violations),
    }


def _start_server(url: str, workers: int, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / "port"
    env = {
        **os.environ,
        "AI_HANDLER_DATABASE_URL": url,
        # The load is the point: neither the key's rate nor a backlog limit may refuse it.
        "AI_HANDLER_API_RATE_PER_MIN": str(10**7),
        "AI_HANDLER_API_MAX_BACKLOG": str(10**6),
        "AI_HANDLER_API_MAX_BACKLOG_PER_USER": str(10**6),
    }
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai_handler_dagster.cli",
            "serve",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ai-handler serve exited: see {folder / 'serve.log'}")
        if port_file.exists():
            base = f"http://127.0.0.1:{port_file.read_text().strip()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    return process, base
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("ai-handler serve did not become ready within 60 s")


def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run the three phases and the audit; returns the report."""
    folder = Path(tempfile.mkdtemp(prefix="ai-handler-load-"))
    with contextlib.ExitStack() as cleanup:
        if config.pipeline:
            from ai_handler_dagster.proving.stack import scratch_databases

            url, dagster_url = cleanup.enter_context(
                scratch_databases(config.pg_admin_url, "aih_load")
            )
            # The stack migrates the database, runs the daemon, the emulator, S3 and its own
            # service (which takes the provider's webhooks); the load goes to the one below.
            cleanup.enter_context(_pipeline(config, folder, url, dagster_url))
        else:
            url = new_database(config.pg_admin_url, "aih_load")
            cleanup.callback(drop_database, config.pg_admin_url, url)
            db.upgrade(url)
        return _load(config, folder, url, cleanup)
    raise AssertionError("unreachable")


def _pipeline(config: LoadConfig, folder: Path, url: str, dagster_url: str) -> Any:
    from ai_handler_dagster.devstack.stack import StackConfig
    from ai_handler_dagster.proving.stack import ProvingStack

    (folder / "stack").mkdir()
    return ProvingStack(
        StackConfig(
            state_dir=folder / "stack",
            storage="postgres",
            dagster_pg_url=dagster_url,
            app_db_url=url,
            latency_s=config.latency,
            concurrency=config.concurrency,
        )
    )


def _load(
    config: LoadConfig, folder: Path, url: str, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    engine = make_engine(url)
    cleanup.callback(engine.dispose)
    with session_scope(engine) as session:
        for user in range(config.users):
            ledger.grant(session, f"load-{user:03d}", 10**9, f"load-grant-{user}")
        key, _ = keys.create(
            session, name="load", scopes=[keys.SUBMIT, keys.READ], rate_per_minute=10**7
        )
    process, base = _start_server(url, config.api_workers, folder)
    cleanup.callback(_stop_server, process)

    def say(text: str) -> None:
        if config.progress:
            sys.stderr.write(f"[api-load] {text}\n")

    say(f"serving on {base} with {config.api_workers} worker(s); warming up")
    asyncio.run(_drive(base, key, "warm", 200, config.clients, _health))
    say(f"GET /healthz x {config.health_count}")
    before = asyncio.run(
        _drive(base, key, "healthz", config.health_count, config.clients, _health, config.rate)
    )
    say(f"POST /v1/generations x {config.count} over {config.users} users")
    submits = asyncio.run(
        _drive(
            base,
            key,
            "submit",
            config.count,
            config.clients,
            _submitter(config.users),
            config.rate,
        )
    )
    say(f"GET /healthz x {config.health_count} again")
    after = asyncio.run(
        _drive(base, key, "healthz", config.health_count, config.clients, _health, config.rate)
    )
    report: dict[str, Any] = {
        "clients": config.clients,
        "rate": config.rate,
        "users": config.users,
        "api_workers": config.api_workers,
        "pipeline": config.pipeline,
    }
    if config.pipeline:
        say(f"waiting for the {len(submits.ids)} accepted generations to end")
        report["settled_s"] = _settle(engine, submits.ids, config.settle_timeout_s, say)
        audit = _audit_ended(engine, submits.ids)
    else:
        audit = _audit(engine, submits.ids, hold_per_generation=5)
    s, h = submits.report(), before.report()
    report.update(
        {
            "submit": s,
            "healthz_before": h,
            "healthz_after": after.report(),
            "submit_rate_vs_healthz": round(s["per_s"] / h["per_s"], 3),
            "submit_p99_vs_healthz_p99": round(s["p99_ms"] / h["p99_ms"], 2),
            "audit": audit,
        }
    )
    return report


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    if process.poll() is None:
        process.kill()


def _settle(engine: sa.Engine, ids: list[int], timeout_s: float, say: Any) -> float:
    """Seconds until every accepted generation is terminal (from the end of the load)."""
    started = time.monotonic()
    last = -1
    while True:
        with session_scope(engine) as session:
            open_ = int(
                session.scalar(
                    sa.select(sa.func.count())
                    .select_from(Generation)
                    .where(Generation.id.in_(ids), Generation.status.not_in(TERMINAL))
                )
                or 0
            )
        if open_ == 0:
            return round(time.monotonic() - started, 1)
        if open_ != last and int(time.monotonic() - started) % 10 == 0:
            say(f"{open_} not ended yet")
            last = open_
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{open_} generations had not ended after {timeout_s:.0f} s")
        time.sleep(1)


def _audit_ended(engine: sa.Engine, accepted: list[int]) -> dict[str, Any]:
    """With the pipeline: every accepted generation exists once and ended, each hold ended,
    and the ledger verifies (``ledger.verify`` and ``generations.verify``)."""
    with session_scope(engine) as session:
        total = int(session.scalar(sa.select(sa.func.count()).select_from(Generation)) or 0)
        rows = session.execute(
            sa.select(Generation.id, Generation.status, Hold.status).join(
                Hold, Hold.id == Generation.hold_id, isouter=True
            )
        ).all()
        violations = [*ledger.verify(session), *generations.verify(session)]
    found = {r[0]: r for r in rows}
    statuses: dict[str, int] = {}
    for i in set(accepted) & set(found):
        statuses[found[i][1]] = statuses.get(found[i][1], 0) + 1
    return {
        "accepted": len(accepted),
        "accepted_distinct": len(set(accepted)),
        "generations": total,
        "missing": len([i for i in accepted if i not in found]),
        "statuses": statuses,
        "holds_still_pending": len(
            [i for i in accepted if i in found and found[i][2] == HoldStatus.PENDING]
        ),
        "not_accepted_but_written": total - len(set(accepted) & set(found)),
        "ledger_violations": len(violations),
    }


def ok(report: dict[str, Any]) -> bool:
    """Every submit accepted (a refusal or an error would make the latency figures those of
    failures), nothing lost or written twice, and the ledger verifies."""
    audit = report["audit"]
    submits = report["submit"]
    if report.get("pipeline"):
        held = audit["holds_still_pending"] == 0 and audit["statuses"] == {
            "succeeded": audit["accepted"]
        }
    else:
        held = audit["without_their_hold"] == 0
    return (
        submits["statuses"] == {"202": submits["requests"]}
        and audit["accepted"] == audit["accepted_distinct"] == audit["generations"]
        and audit["missing"] == 0
        and held
        and audit["not_accepted_but_written"] == 0
        and audit["ledger_violations"] == 0
    )


def print_report(report: dict[str, Any]) -> None:
    """The report as a short table, then as one JSON object."""
    rows = [("submit", report["submit"]), ("healthz before", report["healthz_before"])]
    rows.append(("healthz after", report["healthz_after"]))
    print(f"{'':16}{'requests':>10}{'per_s':>10}{'p50_ms':>10}{'p95_ms':>10}{'p99_ms':>10}")
    for name, r in rows:
        print(
            f"{name:16}{r['requests']:>10}{r['per_s']:>10}{r['p50_ms']:>10}"
            f"{r['p95_ms']:>10}{r['p99_ms']:>10}"
        )
    print(f"submit statuses {json.dumps(report['submit']['statuses'])}")
    print(f"audit {json.dumps(report['audit'])}")
    print(json.dumps(report))
