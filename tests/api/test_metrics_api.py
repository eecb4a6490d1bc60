"""``GET /metrics`` over real HTTP, on SQLite and PostgreSQL, with one worker and with two.

Proves: the answer parses as Prometheus text (and as OpenMetrics when asked for); the figures read
from the database at the scrape (generations by status and error code, credits held and
granted, the settle latency of the generations that ended in the window) are those of a known
state; each request is counted once by method, route template and status (a URL matching no
route under one fixed label); a metric any module registers through prometheus-client is
exposed; an unreachable database is reported, not a failed scrape; and with
``ai-handler serve --workers 2`` every scrape, whichever worker answers it, adds up the requests
both workers answered.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import Counter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from ai_handler_dagster import ledger
from ai_handler_dagster.api.app import create_app
from ai_handler_dagster.api.metrics import SETTLE_BUCKETS, SETTLE_WINDOW, UNMATCHED
from ai_handler_dagster.api.server import start_server
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Account, Generation, utcnow
from ai_handler_dagster.domain import GenerationStatus
from ai_handler_dagster.pricing import load_pricing
from tests.support.api import Api

#: A metric registered the way any other module of the service would register its own.
WIDGETS = Counter("ai_handler_test_widgets_total", "Widgets this test made", ["outcome"])

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(http: httpx.Client) -> Samples:
    answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return _samples(answer.text)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _requests(samples: Samples, method: str, route: str, status: str) -> float:
    return _value(
        samples, "ai_handler_api_request_seconds_count", method=method, route=route, status=status
    )


# --- figures read from the database -------------------------------------------------------------

#: (status, error code, seconds from submit to the end, how long ago it ended) of the known state.
GENERATIONS: list[tuple[str, str | None, float | None, timedelta | None]] = [
    ("pending", None, None, None),
    ("pending", None, None, None),
    ("pending", None, None, None),
    ("queued", None, None, None),
    ("running", None, None, None),
    ("succeeded", None, 0.5, timedelta(seconds=30)),
    ("succeeded", None, 3.0, timedelta(minutes=2)),
    ("succeeded", None, 45.0, timedelta(minutes=5)),
    ("succeeded", None, 4000.0, timedelta(minutes=10)),
    ("succeeded", None, 2.0, SETTLE_WINDOW + timedelta(minutes=5)),  # ended before the window
    ("failed", "provider_error", 12.0, timedelta(minutes=1)),
    ("failed", "provider_error", 700.0, timedelta(minutes=3)),
    ("failed", "timeout", 1900.0, timedelta(minutes=4)),
    ("canceled", None, 8.0, timedelta(minutes=1)),
]


def _known_state(engine: sa.Engine) -> None:
    now = utcnow()
    with session_scope(engine) as session:
        ledger.grant(session, "ann", 500, "ann-1")
        ledger.grant(session, "bob", 300, "bob-1")
        ledger.hold(session, "ann", 30, "ann-h1")
        ledger.hold(session, "bob", 12, "bob-h1")
        ended = ledger.hold(session, "bob", 50, "bob-h2")
        ledger.capture(session, ended.id, 20)
        for i, (status, code, took, ago) in enumerate(GENERATIONS):
            finished = now - ago if ago is not None else None
            created = finished - timedelta(seconds=took) if finished and took else now
            session.add(
                Generation(
                    user_id="ann",
                    model="demo/pixel-sketch",
                    input={"prompt": str(i)},
                    status=status,
                    error_code=code,
                    created_at=created,
                    finished_at=finished,
                )
            )


def test_the_database_figures_are_those_of_a_known_state(api: Api) -> None:
    _known_state(api.engine)
    with api.client() as http:
        samples = _scrape(http)
    assert _value(samples, "ai_handler_metrics_database_up") == 1
    expected: dict[tuple[str, str], int] = {}
    for status, code, _, _ in GENERATIONS:
        expected[(status, code or "")] = expected.get((status, code or ""), 0) + 1
    for status in GenerationStatus:  # a status nobody is in shows 0
        if not any(s == status for s, _ in expected):
            expected[(status, "")] = 0
    shown = {
        (dict(labels)["status"], dict(labels)["error_code"]): value
        for (name, labels), value in samples.items()
        if name == "ai_handler_generations"
    }
    assert shown == expected
    assert shown[("failed", "provider_error")] == 2 and shown[("pending", "")] == 3
    with session_scope(api.engine) as session:
        held = session.scalar(sa.select(sa.func.sum(Account.held)))
        balance = session.scalar(sa.select(sa.func.sum(Account.balance)))
    assert (held, balance) == (30 + 12, 500 + 300 - 20)
    assert _value(samples, "ai_handler_credits_held") == held
    assert _value(samples, "ai_handler_credits_balance") == balance
    for status in ("succeeded", "failed", "canceled"):
        took = [
            t
            for s, _, t, ago in GENERATIONS
            if s == status and t is not None and ago is not None and ago < SETTLE_WINDOW
        ]
        name = "ai_handler_generation_settle_seconds"
        for bound in SETTLE_BUCKETS:
            le = str(bound)
            got = _value(samples, f"{name}_bucket", le=le, status=status)
            assert got == sum(1 for t in took if t <= bound), (status, bound)
        assert _value(samples, f"{name}_bucket", le="+Inf", status=status) == len(took)
        assert _value(samples, f"{name}_gcount", status=status) == len(took)
        assert _value(samples, f"{name}_gsum", status=status) == pytest.approx(sum(took), abs=0.01)


def test_an_empty_database_shows_zeros(api: Api) -> None:
    with api.client() as http:
        samples = _scrape(http)
    for status in GenerationStatus:
        assert _value(samples, "ai_handler_generations", status=status, error_code="") == 0
    assert _value(samples, "ai_handler_credits_held") == 0
    assert _value(samples, "ai_handler_generation_settle_seconds_gcount", status="succeeded") == 0


# --- what the workers measure -------------------------------------------------------------------


def test_each_request_is_counted_once_by_route_template(api: Api) -> None:
    with session_scope(api.engine) as session:
        ledger.grant(session, "ann", 5, "ann-1")
    key = api.key()
    with api.client(key) as http:
        before = _scrape(http)
        for _ in range(5):
            assert http.get("/v1/users/ann/credits").status_code == 200
        assert http.get("/v1/users/zed/credits").status_code == 404
        assert http.post("/v1/users/ann/credits").status_code == 405
        assert http.get("/v1/nowhere/at-all").status_code == 404
        assert http.get("/v1/nowhere/else").status_code == 404
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Declares 100 MB and sends none of it: refused before routing.
        sock.sendall(b"POST /v1/key HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    with api.client(key) as http:
        after = _scrape(http)
    credits = "/v1/users/{user}/credits"
    for method, route, status, n in [
        ("GET", credits, "200", 5),
        ("GET", credits, "404", 1),
        ("POST", credits, "405", 1),
        ("GET", UNMATCHED, "404", 2),
        ("POST", UNMATCHED, "413", 1),  # refused before routing
        ("GET", "/metrics", "200", 1),  # the first scrape
    ]:
        assert (
            _requests(after, method, route, status) - _requests(before, method, route, status) == n
        ), (method, route, status)
    # No series is named after a URL that matched no route.
    routes = {dict(labels).get("route") for (name, labels) in after if "request_seconds" in name}
    assert not any(r and "nowhere" in r for r in routes)


def test_a_metric_registered_elsewhere_is_exposed(api: Api) -> None:
    with api.client() as http:
        before = _value(_scrape(http), "ai_handler_test_widgets_total", outcome="made")
        WIDGETS.labels("made").inc(3)
        after = _value(_scrape(http), "ai_handler_test_widgets_total", outcome="made")
    assert after - before == 3


def test_openmetrics_when_the_scraper_asks_for_it(api: Api) -> None:
    with api.client() as http:
        answer = http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(answer.text)}
    assert {"ai_handler_generations", "ai_handler_generation_settle_seconds"} <= names


def test_an_unreachable_database_is_reported_not_a_failed_scrape(tmp_path: Path) -> None:
    # A database without the app's tables: every query fails.
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with start_server(create_app(engine, prices=load_pricing())) as server:
        answer = httpx.get(f"{server.url}/metrics", timeout=30)
    assert answer.status_code == 200
    samples = _samples(answer.text)
    assert _value(samples, "ai_handler_metrics_database_up") == 0
    assert not any(name == "ai_handler_generations" for name, _ in samples)


# --- several workers ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        if int(ppid) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _owner(server_port: int, client_port: int, workers: list[int]) -> int | None:
    """The worker holding the server end of the connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                inodes.add(f"socket:[{inode}]")
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def _get(sock: socket.socket, path: str) -> tuple[int, str]:
    """One keep-alive ``GET`` on ``sock``: the status and the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body.decode()


@pytest.fixture
def two_workers(engine: sa.Engine, db_url: str, tmp_path: Path) -> Iterator[tuple[int, Any]]:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    port_file = tmp_path / "port"
    env = {
        **os.environ,
        "AI_HANDLER_DATABASE_URL": db_url,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "ai_handler_dagster.cli", "serve", "--workers", "2"),
            *("--port", "0", "--port-file", str(port_file), "--log-level", "warning"),
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or len(_children(process.pid)) < 2:
            assert process.poll() is None, "ai-handler serve exited"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        yield int(port_file.read_text()), process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="finds each connection's worker through /proc"
)
def test_two_workers_add_up_in_every_scrape(two_workers: tuple[int, Any]) -> None:
    port, process = two_workers
    workers = _children(process.pid)
    assert len(workers) == 2
    answered: dict[int, int] = {}
    sockets: list[socket.socket] = []
    requests = 0
    try:
        # New connections until both workers have answered some (the kernel spreads accepts over
        # the processes listening on the socket); each connection stays open, so it keeps its
        # worker.
        deadline = time.monotonic() + 60
        while len(answered) < 2:
            assert time.monotonic() < deadline, f"only {answered} answered"
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sockets.append(sock)
            assert _get(sock, "/healthz")[0] == 200
            requests += 1
            owner = _owner(port, sock.getsockname()[1], workers)
            assert owner is not None
            answered[owner] = answered.get(owner, 0) + 1
        # More requests on every connection, so both workers count several.
        for sock in sockets:
            for _ in range(3):
                assert _get(sock, "/healthz")[0] == 200
                requests += 1
        # Scrape over new connections until both workers have answered a scrape: each shows the
        # sum of both workers' counts.
        scraped: dict[int, float] = {}
        while len(scraped) < 2:
            assert time.monotonic() < deadline, f"only {scraped} scraped"
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sockets.append(sock)
            status, text = _get(sock, "/metrics")
            assert status == 200
            owner = _owner(port, sock.getsockname()[1], workers)
            assert owner is not None
            samples = _samples(text)
            scraped[owner] = _requests(samples, "GET", "/healthz", "200")
            assert _value(samples, "ai_handler_metrics_database_up") == 1
    finally:
        for sock in sockets:
            sock.close()
    assert scraped == {pid: requests for pid in workers}
    assert all(n >= 1 for n in answered.values())
