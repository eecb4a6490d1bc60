"""``ai-handler bench --streams N``: what N open event streams cost the service, and how fast
one state change reaches all of them.

The service runs as ``--api-load`` runs it (``api_load``): ``ai-handler serve`` with
``--api-workers`` processes on a scratch PostgreSQL database, one key. Then, as an application
and its users' browsers would:

1. N pending generations over ``--users`` users, submitted with the key
   (``POST /v1/generations``); nothing runs them, so they stay pending;
2. one user token per stream (``POST /v1/tokens`` with the key, for the generation's user);
3. the idle service over a quiet window (``--stream-window``): each server process's resident
   memory (``VmRSS``; the ``serve`` process and every process below it) and the CPU seconds
   they used (``utime + stime``), the connections the database sees (``pg_stat_activity`` for
   the scratch database), the transactions it committed or rolled back (``pg_stat_database``)
   and the reads of its tables (``pg_stat_user_tables``: sequential and index scans);
4. N event streams (``GET /v1/generations/{id}/events?access_token=<token>``, the way a
   browser's ``EventSource`` sends a token), all open at once; once every one has received
   its first event (``pending``), the same figures over the same window. The streams sleep
   until ``LISTEN/NOTIFY`` wakes them, so the window should show no more transactions and no
   more table reads than the idle one, however many streams are open;
5. every generation canceled in one transaction (``generations.cancel``, the function behind
   ``POST /v1/generations/{id}/cancel``): the delay from that commit until each stream received
   its terminal event (p50, p95, max), and whether every stream then ended.

PostgreSQL flushes an idle backend's statistics up to 10 s late, so each window starts
``settle_s`` after the work before it, and a window's counters may miss its last seconds. The
verdict (``ok``) fails a run where any stream did not open, missed its first or its terminal
event, or did not end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ai_handler_dagster import db, ledger, settings
from ai_handler_dagster import generations as gens
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.devstack.pg import drop_database, new_database
from ai_handler_dagster.domain import TERMINAL, GenerationStatus
from ai_handler_dagster.proving.api_load import INPUT, MODEL, _start_server, _stop_server

#: Requests in flight while the generations are submitted and the tokens minted.
_SETUP_CLIENTS = 16
#: Seconds a user token stays valid: longer than any run.
_TOKEN_TTL_S = 3600
#: The tables whose reads are reported by name (every user table is also summed).
_TABLES = ("generations", "generation_events")


@dataclass
class StreamsConfig:
    pg_admin_url: str
    streams: int = 500
    users: int = 100
    api_workers: int = 2
    #: Seconds of each quiet window (idle, then with the streams open).
    window_s: float = 30.0
    #: Seconds waited before each window, so the statistics of the work before it are flushed.
    settle_s: float = 11.0
    #: Seconds allowed for every stream to open and receive its first event.
    open_timeout_s: float = 120.0
    #: Seconds allowed, after the cancel's commit, for every terminal event to arrive.
    terminal_timeout_s: float = 60.0
    progress: bool = True


@dataclass
class Stream:
    """One client's stream: when it opened, what it received, how it ended."""

    generation_id: int
    token: str
    status: int | None = None
    first_event: str | None = None
    first_at: float | None = None
    events: list[str] = field(default_factory=list)
    pings: int = 0
    terminal: str | None = None
    terminal_at: float | None = None
    ended: bool = False
    error: str | None = None


# --- the server's processes ----------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "serve"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "multiprocessing.spawn" in command or "multiprocessing.forkserver" in command:
        return "worker"
    if "resource_tracker" in command:
        return "resource_tracker"
    return "other"


def _sockets(pid: int) -> set[str]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    found = set()
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found


def _established(port: int) -> set[str]:
    """Socket inodes of the established TCP connections whose local port is ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            if (
                len(columns) > 9
                and columns[3] == "01"
                and int(columns[1].rsplit(":", 1)[1], 16) == port
            ):
                found.add(columns[9])
    return found


@dataclass(frozen=True)
class Proc:
    pid: int
    role: str
    rss_kib: int
    cpu_ticks: int
    clients: int


def _processes(root: int, port: int) -> dict[int, Proc]:
    """Each server process: its role, resident memory, CPU ticks so far and the clients
    connected to it (established connections on the server's port whose socket it holds)."""
    clients = _established(port)
    found = {}
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                rss = next(
                    (int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0
                )
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
        found[pid] = Proc(pid, _role(pid, root), rss, ticks, len(_sockets(pid) & clients))
    return found


# --- the database's view -------------------------------------------------------------------------

_ACTIVITY = sa.text(
    "SELECT count(*) AS total,"
    " count(*) FILTER (WHERE state = 'active') AS active,"
    " count(*) FILTER (WHERE state = 'idle') AS idle,"
    " count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS in_transaction,"
    " count(*) FILTER (WHERE query ILIKE 'LISTEN %') AS listening"
    " FROM pg_stat_activity WHERE datname = :name AND pid <> :mine"
)
_TRANSACTIONS = sa.text(
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :name"
)
_SCANS = sa.text(
    "SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS scans"
    " FROM pg_stat_user_tables"
)


class DatabaseView:
    """Reads the scratch database's statistics without adding to them.

    Connections and transactions are read over a connection to the admin URL's database; table
    reads need a connection to the scratch database, whose own transactions would count: it
    asks PostgreSQL to flush them at once (``pg_stat_force_next_flush``), and the window's
    transaction counts are read after that flush at its start and before its read at its end.
    """

    def __init__(self, admin_url: str, url: str) -> None:
        self.name = sa.make_url(url).database
        self._admin = sa.create_engine(
            admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self._scratch = sa.create_engine(
            url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self._on_admin = self._admin.connect()
        self._on_scratch = self._scratch.connect()
        self._mine = int(self._on_scratch.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        version = int(
            self._on_scratch.execute(sa.text("SHOW server_version_num")).scalar_one() or 0
        )
        self._can_flush = version >= 150000

    def activity(self) -> dict[str, int]:
        row = self._on_admin.execute(_ACTIVITY, {"name": self.name, "mine": self._mine}).one()
        return {k: int(v) for k, v in row._mapping.items()}

    def transactions(self) -> int:
        return int(self._on_admin.execute(_TRANSACTIONS, {"name": self.name}).scalar() or 0)

    def scans(self) -> dict[str, int]:
        rows = self._on_scratch.execute(_SCANS).all()
        if self._can_flush:
            self._on_scratch.execute(sa.text("SELECT pg_stat_force_next_flush()"))
        scans = {str(r.relname): int(r.scans) for r in rows}
        return {
            **{t: scans.get(t, 0) for t in _TABLES},
            "all_tables": sum(scans.values()),
        }

    def close(self) -> None:
        self._on_scratch.close()
        self._on_admin.close()
        self._scratch.dispose()
        self._admin.dispose()


# --- a quiet window ------------------------------------------------------------------------------


async def _window(
    seconds: float, root: int, port: int, view: DatabaseView, pings: Callable[[], int]
) -> dict[str, Any]:
    """The server's memory, CPU and database figures over ``seconds`` of nothing happening."""
    scans_before = view.scans()
    await asyncio.sleep(0.5)  # the forced flush of the read above
    transactions_before = view.transactions()
    procs_before = _processes(root, port)
    pings_before = pings()
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    procs_after = _processes(root, port)
    elapsed = time.perf_counter() - began
    transactions = view.transactions() - transactions_before
    activity = view.activity()
    scans_after = view.scans()
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    processes: list[dict[str, Any]] = []
    total_ticks = 0
    for pid, proc in sorted(procs_after.items()):
        before = procs_before.get(pid)
        # A process born during the window counts from zero.
        ticks = proc.cpu_ticks - (before.cpu_ticks if before is not None else 0)
        total_ticks += ticks
        processes.append(
            {
                "pid": pid,
                "role": proc.role,
                "rss_mib": round(proc.rss_kib / 1024, 1),
                "cpu_s": round(ticks / ticks_per_s, 2),
                "clients": proc.clients,
            }
        )
    cpu_s = total_ticks / ticks_per_s
    return {
        "window_s": round(elapsed, 2),
        "processes": processes,
        "rss_total_mib": round(sum(p.rss_kib for p in procs_after.values()) / 1024, 1),
        "cpu_s": round(cpu_s, 2),
        "cpu_per_s": round(cpu_s / elapsed, 4),
        "db_connections": activity,
        "db_transactions": transactions,
        "table_scans": {k: v - scans_before.get(k, 0) for k, v in scans_after.items()},
        "pings_received": pings() - pings_before,
    }


# --- the clients ---------------------------------------------------------------------------------


async def _bounded(count: int, clients: int, one: Callable[[int], Awaitable[None]]) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await one(index)

    await asyncio.gather(*(worker() for _ in range(clients)))


async def _submit_and_mint(base: str, key: str, config: StreamsConfig) -> list[Stream]:
    """N pending generations over the users, and a user token for each one's stream."""
    users = max(1, min(config.users, config.streams))
    ids: list[int] = [0] * config.streams
    tokens: list[str] = [""] * config.streams
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, headers=headers, timeout=timeout) as client:

        async def submit(index: int) -> None:
            body = {"user": _user(index % users), "model": MODEL, "input": INPUT}
            async with client.post("/v1/generations", json=body) as answer:
                if answer.status != 202:
                    raise RuntimeError(f"submit answered {answer.status}: {await answer.text()}")
                ids[index] = int((await answer.json())["id"])

        async def mint(index: int) -> None:
            body = {"user": _user(index % users), "ttl_s": _TOKEN_TTL_S}
            async with client.post("/v1/tokens", json=body) as answer:
                if answer.status != 201:
                    raise RuntimeError(f"token answered {answer.status}: {await answer.text()}")
                tokens[index] = str((await answer.json())["token"])

        await _bounded(config.streams, _SETUP_CLIENTS, submit)
        await _bounded(config.streams, _SETUP_CLIENTS, mint)
    return [Stream(i, t) for i, t in zip(ids, tokens, strict=True)]


def _user(index: int) -> str:
    return f"streams-{index:04d}"


async def _follow(client: aiohttp.ClientSession, stream: Stream) -> None:
    """Read one stream as an ``EventSource`` would, noting when each event arrived."""
    try:
        async with client.get(
            f"/v1/generations/{stream.generation_id}/events",
            params={"access_token": stream.token},
            headers={"Accept": "text/event-stream"},
        ) as answer:
            stream.status = answer.status
            if answer.status != 200:
                stream.error = f"answered {answer.status}"
                return
            name: str | None = None
            async for raw in answer.content:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line:
                    if name is not None:
                        _received(stream, name)
                    name = None
                elif line.startswith(":"):
                    stream.pings += 1
                elif line.startswith("event:"):
                    name = line[6:].strip()
            stream.ended = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        stream.error = f"{type(exc).__name__}: {exc}"


def _received(stream: Stream, name: str) -> None:
    now = time.perf_counter()
    stream.events.append(name)
    if stream.first_event is None:
        stream.first_event, stream.first_at = name, now
    if name in TERMINAL and stream.terminal is None:
        stream.terminal, stream.terminal_at = name, now


async def _until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _cancel_all(engine: sa.Engine, ids: list[int]) -> tuple[float, float]:
    """Cancel every generation in one transaction; when its commit began and ended."""
    with Session(engine, expire_on_commit=False) as session:
        for generation_id in ids:
            gens.cancel(session, generation_id, message="canceled by bench --streams")
        session.flush()
        began = time.perf_counter()
        session.commit()
        return began, time.perf_counter()


# --- the run -------------------------------------------------------------------------------------


def run_streams(config: StreamsConfig) -> dict[str, Any]:
    """Set up the scratch database and the service, measure; returns the report."""
    if config.streams < 1:
        raise ValueError("--streams needs at least one stream")
    folder = Path(tempfile.mkdtemp(prefix="ai-handler-streams-"))
    with contextlib.ExitStack() as cleanup:
        url = new_database(config.pg_admin_url, "aih_streams")
        cleanup.callback(drop_database, config.pg_admin_url, url)
        db.upgrade(url)
        engine = make_engine(url)
        cleanup.callback(engine.dispose)
        users = max(1, min(config.users, config.streams))
        with session_scope(engine) as session:
            for user in range(users):
                ledger.grant(session, _user(user), 10**9, f"streams-grant-{user}")
            key, _ = keys.create(
                session, name="streams", scopes=[keys.SUBMIT, keys.READ], rate_per_minute=10**7
            )
        process, base = _start_server(url, config.api_workers, folder)
        cleanup.callback(_stop_server, process)
        view = DatabaseView(config.pg_admin_url, url)
        cleanup.callback(view.close)
        return asyncio.run(_measure(config, engine, process.pid, base, key, view))
    raise AssertionError("unreachable")


async def _measure(
    config: StreamsConfig, engine: sa.Engine, root: int, base: str, key: str, view: DatabaseView
) -> dict[str, Any]:
    def say(text: str) -> None:
        if config.progress:
            sys.stderr.write(f"[streams] {text}\n")

    port = int(base.rsplit(":", 1)[1])
    say(f"serving on {base} with {config.api_workers} worker(s)")
    say(f"submitting {config.streams} generations and minting a token for each")
    streams = await _submit_and_mint(base, key, config)
    engine.dispose()  # no connection of this process to the scratch database but the view's

    def pings() -> int:
        return sum(s.pings for s in streams)

    say(f"idle service: {config.settle_s:.0f} s settle, then a {config.window_s:.0f} s window")
    await asyncio.sleep(config.settle_s)
    idle = await _window(config.window_s, root, port, view, pings)

    say(f"opening {config.streams} event streams")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:
        opened_from = time.perf_counter()
        tasks = [asyncio.create_task(_follow(client, s)) for s in streams]
        all_open = await _until(
            lambda: all(s.first_event is not None or s.error or s.ended for s in streams),
            config.open_timeout_s,
        )
        open_s = time.perf_counter() - opened_from
        say(
            f"{sum(s.first_event is not None for s in streams)} streams open with their first "
            f"event in {open_s:.1f} s; {config.settle_s:.0f} s settle, then a "
            f"{config.window_s:.0f} s window"
        )
        await asyncio.sleep(config.settle_s)
        streaming = await _window(config.window_s, root, port, view, pings)

        say("canceling every generation in one transaction")
        ids = [s.generation_id for s in streams]
        commit_began, commit_ended = await asyncio.to_thread(_cancel_all, engine, ids)
        _done, pending = await asyncio.wait(tasks, timeout=config.terminal_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        say(f"{sum(s.terminal is not None for s in streams)} terminal events received")

    with session_scope(engine) as session:
        canceled = int(
            session.scalar(
                sa.select(sa.func.count())
                .select_from(Generation)
                .where(Generation.id.in_(ids), Generation.status == GenerationStatus.CANCELED)
            )
            or 0
        )
    delays = sorted(s.terminal_at - commit_began for s in streams if s.terminal_at is not None)
    errors: dict[str, int] = {}
    for s in streams:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    n = len(streams)
    rss_added = streaming["rss_total_mib"] - idle["rss_total_mib"]
    return {
        "streams": n,
        "users": max(1, min(config.users, n)),
        "api_workers": config.api_workers,
        "ping_s": settings.api_events_ping_s(),
        "open": {
            "all_within_timeout": all_open,
            "answered_200": sum(s.status == 200 for s in streams),
            "first_event": sum(s.first_event is not None for s in streams),
            "first_event_pending": sum(s.first_event == GenerationStatus.PENDING for s in streams),
            "seconds": round(open_s, 2),
        },
        "idle": idle,
        "streaming": streaming,
        "rss_per_stream_kib": round(1024 * rss_added / n, 1),
        "cpu_per_s_added": round(streaming["cpu_per_s"] - idle["cpu_per_s"], 4),
        "terminal": {
            "canceled_in_db": canceled,
            "commit_s": round(commit_ended - commit_began, 3),
            "received": len(delays),
            "received_canceled": sum(s.terminal == GenerationStatus.CANCELED for s in streams),
            "missed": n - len(delays),
            "ended": sum(s.ended and s.terminal is not None for s in streams),
            "still_open": len(pending),
            **_delays(delays),
        },
        "errors": errors,
    }


def _delays(delays: list[float]) -> dict[str, float | None]:
    if not delays:
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return round(1000 * delays[min(len(delays) - 1, int(p * len(delays)))], 1)

    return {"p50_ms": pct(0.50), "p95_ms": pct(0.95), "max_ms": round(1000 * delays[-1], 1)}


def ok(report: dict[str, Any]) -> bool:
    """Every stream opened and received its first event, then its terminal one, and ended."""
    n, opened, terminal = report["streams"], report["open"], report["terminal"]
    return (
        opened["answered_200"] == opened["first_event_pending"] == n
        and terminal["received_canceled"] == terminal["ended"] == n
        and terminal["missed"] == 0
        and not report["errors"]
    )


def print_report(report: dict[str, Any]) -> None:
    """The report as short tables (each server process, then the service's figures), then as
    one JSON object."""
    idle, streaming = report["idle"], report["streaming"]
    opened, terminal = report["open"], report["terminal"]
    print(
        f"{report['streams']} event streams over {report['users']} users, "
        f"{report['api_workers']} API worker(s), ping every {report['ping_s']} s; "
        f"{opened['first_event']} open with their first event in {opened['seconds']} s; "
        f"windows of {idle['window_s']} s (idle) and {streaming['window_s']} s (streams)"
    )
    print(
        f"{'process':24}{'rss MiB':>10}{'rss MiB':>10}{'cpu s':>8}{'cpu s':>8}{'clients':>9}\n"
        f"{'':24}{'idle':>10}{'streams':>10}{'idle':>8}{'streams':>8}{'streams':>9}"
    )
    was = {p["pid"]: p for p in idle["processes"]}
    for proc in streaming["processes"]:
        before = was.get(proc["pid"], {})
        print(
            f"{proc['role'] + ' ' + str(proc['pid']):24}{before.get('rss_mib', '-')!s:>10}"
            f"{proc['rss_mib']:>10}{before.get('cpu_s', '-')!s:>8}{proc['cpu_s']:>8}"
            f"{proc['clients']:>9}"
        )
    rows: list[tuple[str, Any, Any]] = [
        ("rss MiB, all processes", idle["rss_total_mib"], streaming["rss_total_mib"]),
        ("cpu s, all processes", idle["cpu_s"], streaming["cpu_s"]),
        ("cpu s per s", idle["cpu_per_s"], streaming["cpu_per_s"]),
    ]
    for name in ("total", "active", "idle", "in_transaction", "listening"):
        rows.append(
            (
                f"db connections {name}",
                idle["db_connections"][name],
                streaming["db_connections"][name],
            )
        )
    rows.append(("db transactions", idle["db_transactions"], streaming["db_transactions"]))
    for name in idle["table_scans"]:
        rows.append(
            (f"table scans {name}", idle["table_scans"][name], streaming["table_scans"][name])
        )
    rows.append(("keep-alive pings received", idle["pings_received"], streaming["pings_received"]))
    print(f"\n{'service':32}{'idle':>10}{'streams':>10}")
    for label, a, b in rows:
        print(f"{label:32}{a!s:>10}{b!s:>10}")
    print(
        f"\nadded per stream: {report['rss_per_stream_kib']} KiB resident; "
        f"added CPU: {report['cpu_per_s_added']} s per s for all streams"
    )
    print(
        f"terminal events: {terminal['received']}/{report['streams']} received "
        f"({terminal['received_canceled']} canceled), {terminal['ended']} streams ended; "
        f"{terminal['canceled_in_db']} canceled in one commit of {terminal['commit_s']} s"
    )
    print(
        f"delay from the commit: p50 {terminal['p50_ms']} ms, p95 {terminal['p95_ms']} ms, "
        f"max {terminal['max_ms']} ms"
    )
    if report["errors"]:
        print(f"errors {json.dumps(report['errors'])}")
    print(json.dumps(report))
