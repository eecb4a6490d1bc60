"""``ai-handler bench``: throughput through the real Dagster path, against the provider's limit.

The stack runs the way production does: app database and Dagster storage on PostgreSQL (or SQLite
with ``--storage sqlite``), the Replicate emulator with model latency L and a hardware cap of C
predictions, the local S3 endpoint, a code location and a real ``dagster-daemon`` (sensor -> run
queue -> run launcher -> runs). No system can finish more than C/L generations a second, so
``efficiency = throughput / (C / L)`` says how close the project gets.

``--naive`` runs the same workload with one generation per run, Dagster's default multiprocess
executor and Dagster's way of starting runs (a fresh interpreter each, no warm process);
``--compare`` runs both and prints the ratio.

``--rate-limit N`` (and ``--rate-burst B``) has the emulator enforce a create limit of N a
minute with a bucket of B (default: a minute's worth), and configures the project's create
throttle to the same limit, as an operator would for their account. The report then adds
creates a minute in the steady state (from the moment a bucket of the emulator's rate and burst,
full at the load's first create, first runs dry, to the last create: the window is reported),
the share of create requests answered 429, and the generations failed for rate limiting:
under the throttle a 429 spends no attempt, so a throttled generation waits and fails only at
its queue deadline, with ``deadline_exceeded`` before any create (``failed_queue_deadline``);
``failed_rate_limited`` counts failures with ``rate_limited`` (none are expected).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import dispose_engines, make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.devstack.emulator import EmulatorControl
from ai_handler_dagster.devstack.stack import StackConfig
from ai_handler_dagster.domain import TERMINAL
from ai_handler_dagster.instance import WORKSPACE_FILE
from ai_handler_dagster.proving.stack import DEFAULT_PG_URL, ProvingStack, scratch_databases
from ai_handler_dagster.replicate.snapshot import parse_time


@dataclass
class BenchConfig:
    """One benchmark run."""

    count: int = 1000
    latency: float = 2.0
    concurrency: int = 32
    storage: str = "postgres"
    naive: bool = False
    users: int = 8
    idle_samples: int = 3
    timeout_s: float = 1800.0
    pg_admin_url: str = DEFAULT_PG_URL
    #: Settings of the optimized design (ignored with ``naive``).
    max_batch: int = 128
    max_in_flight: int = 384
    #: Runs in progress at once (None: the shipped ``dagster.yaml``'s).
    max_concurrent_runs: int | None = None
    webhooks: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    #: The emulator's create limit, per minute, enforced (None: reported, not enforced).
    rate_limit: int | None = None
    #: Its bucket's size (None: a minute's worth).
    rate_burst: int | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _api_calls(stats: dict[str, Any]) -> int:
    return sum(n for route, n in stats.get("requests", {}).items() if " /v1/" in route)


def _process_kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for needle, kind in (
        ("devstack.emulator", "emulator"),
        ("devstack.s3", "s3"),
        ("ai_handler_dagster.cli serve", "api"),
        ("ai_handler_dagster.runtime.daemon", "daemon"),
        ("dagster-daemon", "daemon"),
        ("code-server", "code_server"),
        ("api grpc", "code_server"),
        ("multiprocessing", "run_worker"),
        ("execute_run", "run_worker"),
        ("execute_step", "run_worker"),
    ):
        if needle in cmd:
            return kind
    return "other"


class _RssSampler(threading.Thread):
    """Samples the stack's processes: the peak of their summed resident memory, and the CPU
    seconds each kind of process (emulator, S3, daemon, run workers, ...) used while sampling."""

    def __init__(self, stack: ProvingStack, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (kind, first, last)
        self._stop_event = threading.Event()

    def run(self) -> None:
        page = 4096
        ticks = 100.0
        while not self._stop_event.is_set():
            total = 0
            for pid in self.stack.pids():
                try:
                    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
                        total += int(statm.read().split()[1]) * page
                    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / ticks
                except (OSError, ValueError, IndexError):
                    continue
                if pid in self._cpu:
                    kind, first, _ = self._cpu[pid]
                    self._cpu[pid] = (kind, first, cpu)
                else:
                    # A process born during sampling counts from zero; one already running
                    # counts from its first sample.
                    born_now = bool(self._cpu)
                    self._cpu[pid] = (_process_kind(pid), 0.0 if born_now else cpu, cpu)
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self.interval_s)

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, first, last in self._cpu.values():
            out[kind] = round(out.get(kind, 0.0) + last - first, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _insert(engine: sa.Engine, users: list[str], count: int, tag: str) -> list[int]:
    """Insert ``count`` image requests round-robin over users, as an application would."""
    rows = [
        {
            "user_id": users[i % len(users)],
            "model": "demo/pixel-sketch",
            "input": {"prompt": f"{tag} picture {i}", "seed": i, "width": 64, "height": 64},
            "status": "pending",
        }
        for i in range(count)
    ]
    with session_scope(engine) as session:
        result = session.execute(sa.insert(Generation).returning(Generation.id), rows)
        return [row[0] for row in result]


def _wait(engine: sa.Engine, ids: list[int], timeout_s: float, progress: bool) -> None:
    deadline = time.monotonic() + timeout_s
    last = -1
    first, last_id = min(ids), max(ids)
    while True:
        with session_scope(engine) as session:
            done = session.scalar(
                sa.select(sa.func.count())
                .select_from(Generation)
                .where(
                    Generation.id.between(first, last_id),
                    Generation.status.in_(TERMINAL),
                )
            )
        done = int(done or 0)
        if progress and done != last:
            sys.stderr.write(f"\r  {done}/{len(ids)} settled")
            sys.stderr.flush()
            last = done
        if done >= len(ids):
            if progress:
                sys.stderr.write("\n")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done}/{len(ids)} generations settled in {timeout_s:.0f}s")
        time.sleep(0.25)


def _timings(engine: sa.Engine, ids: list[int]) -> tuple[list[float], float, dict[str, int]]:
    with session_scope(engine) as session:
        rows = session.execute(
            sa.select(Generation.created_at, Generation.finished_at, Generation.status).where(
                Generation.id.in_(ids)
            )
        ).all()
    latencies = [(f - c).total_seconds() for c, f, _ in rows if f is not None]
    wall = (max(f for _, f, _ in rows if f) - min(c for c, _, _ in rows)).total_seconds()
    by_status: dict[str, int] = {}
    for _, _, status in rows:
        by_status[status] = by_status.get(status, 0) + 1
    return latencies, wall, by_status


def idle_phases(instance: Any, engine: sa.Engine, generation_id: int) -> dict[str, float]:
    """Where one generation's latency went, from its row and its run's Dagster event log.

    Phases, in seconds: ``sensor`` (request inserted -> run enqueued: the sensor tick and the run's
    creation), ``dequeue`` (enqueued -> starting), ``launch`` (starting -> the worker process
    runs), then each op's duration by name, ``gaps`` (time between ops: event writes, loading
    inputs) and ``after_ops`` (the last op's end -> the row terminal, negative when the row ended
    inside the last op).
    """
    from dagster import DagsterEventType

    with session_scope(engine) as session:
        row = session.get(Generation, generation_id)
        if row is None or row.dagster_run_id is None or row.finished_at is None:
            return {}
        # The column type returns aware UTC datetimes on both dialects.
        created, finished = row.created_at.timestamp(), row.finished_at.timestamp()
        run_id = row.dagster_run_id
    marks: dict[str, float] = {}
    steps: dict[str, list[float]] = {}
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind == DagsterEventType.RUN_ENQUEUED:
            marks.setdefault("enqueued", entry.timestamp)
        elif kind == DagsterEventType.RUN_STARTING:
            marks.setdefault("starting", entry.timestamp)
        elif kind == DagsterEventType.RUN_START:
            marks.setdefault("started", entry.timestamp)
        elif kind == DagsterEventType.ENGINE_EVENT and (event.message or "").startswith(
            "Started process"
        ):
            marks.setdefault("process", entry.timestamp)
        elif kind == DagsterEventType.STEP_START and event.step_key:
            steps.setdefault(event.step_key, []).append(entry.timestamp)
        elif (
            kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
            and event.step_key in steps
        ):
            steps[event.step_key].append(entry.timestamp)
    if not {"enqueued", "starting"} <= set(marks) or not steps:
        return {}
    process = marks.get("process", marks.get("started", marks["starting"]))
    phases = {
        "sensor": marks["enqueued"] - created,
        "dequeue": marks["starting"] - marks["enqueued"],
        "launch": process - marks["starting"],
    }
    spans = sorted((times[0], times[-1], key) for key, times in steps.items())
    busy = 0.0
    for start, end, key in spans:
        phases[key] = end - start
        busy += end - start
    phases["gaps"] = (spans[-1][1] - process) - busy
    phases["after_ops"] = finished - spans[-1][1]
    return {k: round(v, 3) for k, v in phases.items()}


def _median_phases(samples: list[dict[str, float]]) -> dict[str, float]:
    if not samples:
        return {}
    return {k: round(statistics.median(s[k] for s in samples if k in s), 2) for k in samples[0]}


#: Options of ``ai-handler bench`` that change an instance setting of the shipped ``dagster.yaml``.
INSTANCE_OPTIONS = {
    "--max-runs": "concurrency.runs.max_concurrent_runs",
    "--naive": "run_launcher.config.warm_start",
}


#: The naive design's code location (``proving/naive.py``), under the project's location name.
NAIVE_WORKSPACE = """\
load_from:
  - python_module:
      module_name: ai_handler_dagster.proving.naive
      attribute: defs
      location_name: ai_handler
"""


def instance_overrides(config: BenchConfig) -> dict[str, Any]:
    """The instance settings this benchmark changes (none by default: production's)."""
    overrides: dict[str, Any] = {}
    if config.max_concurrent_runs is not None:
        overrides[INSTANCE_OPTIONS["--max-runs"]] = config.max_concurrent_runs
    if config.naive:
        # The naive design starts each run the way Dagster does by default: a fresh interpreter.
        overrides[INSTANCE_OPTIONS["--naive"]] = False
    return overrides


def _stack_config(
    config: BenchConfig, state_dir: Path, app_url: str, dagster_url: str | None
) -> StackConfig:
    env = {"AI_HANDLER_SENSOR_INTERVAL_S": "1", **config.extra_env}
    workspace = WORKSPACE_FILE
    if config.naive:
        # One generation per run on Dagster's default executor (its own code location,
        # proving/naive.py): the design this project replaces.
        workspace = state_dir / "naive-workspace.yaml"
        workspace.write_text(NAIVE_WORKSPACE)
        env.update(
            {
                "AI_HANDLER_MAX_BATCH": "1",
                "AI_HANDLER_SMALL_BACKLOG": str(10**9),
                "AI_HANDLER_MAX_IN_FLIGHT": str(config.max_in_flight),
            }
        )
    else:
        env.update(
            {
                "AI_HANDLER_MAX_BATCH": str(config.max_batch),
                "AI_HANDLER_MAX_IN_FLIGHT": str(config.max_in_flight),
            }
        )
    emulator_args: list[str] = []
    if config.rate_limit is not None:
        burst = config.rate_burst or config.rate_limit
        emulator_args = [
            "--rate-limit",
            "--creates-per-minute",
            str(config.rate_limit),
            "--creates-burst",
            str(burst),
        ]
        # The throttle knows the account's limit, as an operator configures it.
        env.update(
            {
                "AI_HANDLER_CREATE_RATE_PER_MIN": str(config.rate_limit),
                "AI_HANDLER_CREATE_BURST": str(burst),
            }
        )
    return StackConfig(
        emulator_args=emulator_args,
        state_dir=state_dir,
        storage="postgres" if dagster_url else "sqlite",
        dagster_pg_url=dagster_url,
        app_db_url=app_url,
        latency_s=config.latency,
        concurrency=config.concurrency,
        instance_overrides=instance_overrides(config),
        webhooks=config.webhooks,
        extra_env=env,
        workspace=workspace,
    )


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one benchmark on a fresh stack and return its report (keys: ``REPORT_KEYS``)."""
    state = Path(tempfile.mkdtemp(prefix="ai-handler-bench-"))
    with contextlib.ExitStack() as cleanup:
        dagster_url: str | None
        if config.storage == "postgres":
            app_url, dagster_url = cleanup.enter_context(
                scratch_databases(config.pg_admin_url, "aih_bench")
            )
        elif config.storage == "sqlite":
            app_url, dagster_url = f"sqlite:///{state / 'app.db'}", None
            cleanup.callback(dispose_engines)
        else:
            raise ValueError(f"--storage must be postgres or sqlite, got {config.storage!r}")
        stack = ProvingStack(_stack_config(config, state, app_url, dagster_url))
        with stack:
            return _measure(config, stack, app_url, progress)


def _measure(
    config: BenchConfig, stack: ProvingStack, app_url: str, progress: bool
) -> dict[str, Any]:
    engine = make_engine(app_url)
    users = [f"bench-{i}" for i in range(config.users)]
    with session_scope(engine) as session:
        for user in users:
            ledger.grant(session, user, 10**9, key=f"bench-grant:{user}")
    emulator = EmulatorControl(stack.emulator_url)
    say = (lambda text: sys.stderr.write(text + "\n")) if progress else (lambda text: None)
    mode = "naive" if config.naive else "batched"
    overrides = stack.overrides()
    if config.naive:
        overrides["code_location"] = {"module": "ai_handler_dagster.proving.naive"}
    say(f"[{mode}] overrides of production's settings: {json.dumps(overrides)}")
    say(f"[{mode}] stack up; warming up (the first run also waits for the daemon)")

    # Idle overhead: one generation into an idle system, repeated; the first one is a warm-up.
    idle: list[float] = []
    phases: list[dict[str, float]] = []
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(stack.dagster_home)) as instance:
        for sample in range(config.idle_samples + 1):
            [gid] = _insert(engine, users[:1], 1, f"idle-{sample}")
            _wait(engine, [gid], 600, progress=False)
            latencies, _, _ = _timings(engine, [gid])
            if sample > 0:
                idle.append(latencies[0] - config.latency)
                phases.append(idle_phases(instance, engine, gid))
    idle_breakdown = _median_phases([p for p in phases if p])
    say(f"[{mode}] idle overhead samples: {[round(x, 2) for x in idle]}")
    say(f"[{mode}] idle latency by phase (median s): {json.dumps(idle_breakdown)}")

    stats_before = emulator.stats()
    before = _api_calls(stats_before)
    sampler = _RssSampler(stack)
    sampler.start()
    say(f"[{mode}] submitting {config.count} generations for {len(users)} users")
    load_started = time.time()
    ids = _insert(engine, users, config.count, "load")
    try:
        _wait(engine, ids, config.timeout_s, progress)
    finally:
        sampler.stop()
    latencies, wall, by_status = _timings(engine, ids)
    calls = _api_calls(emulator.stats()) - before
    with session_scope(engine) as session:
        violations = ledger.verify(session) + gens.verify(session)
    throughput = config.count / wall if wall > 0 else float("nan")
    rate: dict[str, Any] = {}
    if config.rate_limit is not None:
        rate = rate_limit_report(
            config, emulator, stats_before, engine, ids, load_started=load_started
        )
        say(f"[{mode}] rate limit: {json.dumps(rate)}")
    report = {
        "mode": mode,
        "count": config.count,
        "latency": config.latency,
        "concurrency": config.concurrency,
        "storage": config.storage,
        "webhooks": config.webhooks,
        "wall_s": round(wall, 2),
        "throughput": round(throughput, 3),
        "efficiency": round(throughput / (config.concurrency / config.latency), 3),
        "latency_p50_s": round(_percentile(latencies, 0.5), 2),
        "latency_p95_s": round(_percentile(latencies, 0.95), 2),
        "idle_overhead_p50_s": round(statistics.median(idle), 2) if idle else None,
        "idle_breakdown_s": idle_breakdown,
        "api_calls_per_generation": round(calls / config.count, 2),
        "peak_rss_mib": round(sampler.peak_bytes / 2**20, 1),
        "ledger_violations": len(violations),
        "statuses": by_status,
        "cpu_s_by_process": sampler.cpu_by_kind(),
        "overrides": overrides,
    }
    if rate:
        report["rate_limit"] = rate
    return report


def steady_window(
    created: list[float], per_minute: float, burst: int
) -> tuple[float, float, int] | None:
    """The steady state of a create-limited load: (start, end, creates after start).

    It starts when a bucket of the provider's ``per_minute`` and ``burst``, full at the first
    create, first runs dry (the burst is spent), and ends at the last create. None when the
    load never ran the bucket dry (the limit was never reached).
    """
    times = sorted(created)
    rate = per_minute / 60.0
    tokens, last = float(burst), None
    for index, t in enumerate(times):
        if last is not None:
            tokens = min(float(burst), tokens + (t - last) * rate)
        last = t
        tokens -= 1.0
        if tokens < 1.0 and index + 1 < len(times):
            return t, times[-1], len(times) - index - 1
    return None


def rate_limit_report(
    config: BenchConfig,
    emulator: EmulatorControl,
    stats_before: dict[str, Any],
    engine: sa.Engine,
    ids: list[int],
    *,
    load_started: float,
) -> dict[str, Any]:
    """Creates a minute in the steady state, the share of creates answered 429 and the
    generations failed for rate limiting (``rate_limited``, and ``deadline_exceeded`` before any
    create: the queue deadline), for ``--rate-limit``."""
    assert config.rate_limit is not None
    burst = config.rate_burst or config.rate_limit
    stats = emulator.stats()
    created = [
        t
        for p in emulator.predictions()
        if (t := parse_time(p.get("created_at"))) is not None and t >= load_started
    ]
    requests = stats["create_requests"] - stats_before["create_requests"]
    refused = stats["creates_throttled"] - stats_before["creates_throttled"]
    with session_scope(engine) as session:
        rate_limited = session.scalar(
            sa.select(sa.func.count())
            .select_from(Generation)
            .where(Generation.id.in_(ids), Generation.error_code == "rate_limited")
        )
        # Under the throttle a throttled generation waits; its only way out is the queue
        # deadline, before any prediction was created.
        queue_deadline = session.scalar(
            sa.select(sa.func.count())
            .select_from(Generation)
            .where(
                Generation.id.in_(ids),
                Generation.error_code == "deadline_exceeded",
                Generation.prediction_id.is_(None),
            )
        )
    out: dict[str, Any] = {
        "per_minute": config.rate_limit,
        "burst": burst,
        "creates": len(created),
        "create_requests": requests,
        "creates_answered_429": refused,
        "create_429_fraction": round(refused / requests, 4) if requests else 0.0,
        "failed_rate_limited": int(rate_limited or 0),
        "failed_queue_deadline": int(queue_deadline or 0),
    }
    window = steady_window(created, config.rate_limit, burst)
    if window is not None:
        start, end, count = window
        per_min = count / (end - start) * 60 if end > start else float("nan")
        out.update(
            {
                "steady_window_s": [round(start - load_started, 1), round(end - load_started, 1)],
                "steady_creates": count,
                "steady_creates_per_min": round(per_min, 1),
                "steady_fraction_of_limit": round(per_min / config.rate_limit, 3),
            }
        )
    return out


REPORT_KEYS = (
    "count",
    "latency",
    "concurrency",
    "wall_s",
    "throughput",
    "efficiency",
    "latency_p50_s",
    "latency_p95_s",
    "idle_overhead_p50_s",
    "api_calls_per_generation",
    "peak_rss_mib",
    "ledger_violations",
)


def _table(reports: list[dict[str, Any]]) -> str:
    keys = [k for k in (*REPORT_KEYS, "statuses") if any(k in r for r in reports)]
    # Columns as wide as their widest cell (a status count can be long), at least 16.
    width = max(16, *(len(json.dumps(r.get(k))) + 2 for r in reports for k in keys))
    header = f"{'':26}" + "".join(f"{r['mode']:>{width}}" for r in reports)
    lines = [header]
    for key in keys:
        cells = "".join(f"{json.dumps(r.get(key)):>{width}}" for r in reports)
        lines.append(f"{key:26}{cells}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark(s) and print the table (and JSON with ``--json``)."""
    if args.streams is not None:
        from ai_handler_dagster.proving import streams_load

        streams_report = streams_load.run_streams(
            streams_load.StreamsConfig(
                pg_admin_url=args.pg_url,
                streams=args.streams,
                users=args.users,
                api_workers=args.api_workers,
                window_s=args.stream_window,
                progress=not args.quiet,
            )
        )
        streams_load.print_report(streams_report)
        return 0 if streams_load.ok(streams_report) else 1
    if args.rate_burst is not None and args.rate_limit is None:
        sys.stderr.write("error: --rate-burst needs --rate-limit\n")
        return 2
    if args.idle_api:
        from ai_handler_dagster.proving import idle_api

        idle_report = idle_api.run_idle_api(
            idle_api.IdleApiConfig(
                pg_admin_url=args.pg_url,
                samples=args.idle_samples or 20,
                latency=args.latency,
                progress=not args.quiet,
            )
        )
        idle_api.print_report(idle_report)
        if args.json:
            print(json.dumps(idle_report))
        return 0
    if args.api_load:
        from ai_handler_dagster.proving import api_load

        report = api_load.run_load(
            api_load.LoadConfig(
                pg_admin_url=args.pg_url,
                count=args.count,
                clients=args.clients,
                users=args.users,
                api_workers=args.api_workers,
                health_count=args.health_count,
                rate=args.rate,
                progress=not args.quiet,
                pipeline=args.pipeline,
                latency=args.latency,
                concurrency=args.concurrency,
            )
        )
        api_load.print_report(report)
        return 0 if api_load.ok(report) else 1
    base = BenchConfig(
        count=args.count,
        latency=args.latency,
        concurrency=args.concurrency,
        storage=args.storage,
        pg_admin_url=args.pg_url,
        max_batch=args.max_batch,
        max_in_flight=args.max_in_flight,
        max_concurrent_runs=args.max_runs,
        idle_samples=args.idle_samples or 3,
        webhooks=not args.no_webhooks,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
    )
    reports: list[dict[str, Any]] = []
    if args.compare or not args.naive:
        reports.append(run_bench(base, progress=not args.quiet))
    if args.compare or args.naive:
        naive = BenchConfig(**{**base.__dict__, "naive": True})
        if args.compare:
            naive.count = args.naive_count
        reports.append(run_bench(naive, progress=not args.quiet))
    result = dict(reports[0])
    if args.compare:
        result["naive_throughput"] = reports[1]["throughput"]
        result["naive_count"] = reports[1]["count"]
        result["speedup_vs_naive"] = round(reports[0]["throughput"] / reports[1]["throughput"], 1)
        result["naive"] = reports[1]
    print(_table(reports))
    for r in reports:
        for key, value in r.get("rate_limit", {}).items():
            print(f"{'rate_limit.' + key:34}{json.dumps(value):>16}")
    if args.compare:
        print(f"speedup_vs_naive          {result['speedup_vs_naive']:>16}")
    if args.json:
        print(json.dumps(result))
    return 0 if all(r["ledger_violations"] == 0 for r in reports) else 1


def register(sub: Any) -> None:
    """Add ``bench`` to the CLI."""
    p = sub.add_parser("bench", help="measure throughput through the real Dagster path")
    p.add_argument("--count", type=int, default=1000, help="generations (default 1000)")
    p.add_argument("--latency", type=float, default=2.0, help="model seconds L (default 2)")
    p.add_argument("--concurrency", type=int, default=32, help="provider slots C (default 32)")
    p.add_argument("--storage", choices=("postgres", "sqlite"), default="postgres")
    p.add_argument(
        "--naive",
        action="store_true",
        help="one generation per run, multiprocess; sets the instance setting "
        f"{INSTANCE_OPTIONS['--naive']} to false",
    )
    p.add_argument("--compare", action="store_true", help="run both designs; print the ratio")
    p.add_argument("--naive-count", type=int, default=40, help="generations for the naive run")
    p.add_argument("--max-batch", type=int, default=128, help="generations per run (batched)")
    p.add_argument("--max-in-flight", type=int, default=384, help="queued+running at once")
    inst = p.add_argument_group(
        "instance settings", "options that override a setting of the shipped dagster.yaml"
    )
    inst.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help=f"{INSTANCE_OPTIONS['--max-runs']}: runs in progress at once "
        "(default: dagster.yaml's)",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        metavar="N",
        help="the emulator enforces N creates a minute (429s), the create throttle is set to N; "
        "reports creates/min in the steady state and the share answered 429",
    )
    p.add_argument(
        "--rate-burst",
        type=int,
        default=None,
        metavar="B",
        help="with --rate-limit: creates let through at once (default: a minute's worth)",
    )
    p.add_argument("--no-webhooks", action="store_true", help="poll only (no webhooks asked for)")
    load = p.add_argument_group(
        "the HTTP API's load (--api-load)",
        "submits a second and their latency through ai-handler serve on PostgreSQL, against "
        "the same server's GET /healthz; --count submits",
    )
    load.add_argument("--api-load", action="store_true", help="run the API load instead")
    load.add_argument("--clients", type=int, default=32, help="requests in flight (default 32)")
    load.add_argument("--users", type=int, default=100, help="users spread over (default 100)")
    load.add_argument("--api-workers", type=int, default=2, help="serve --workers (default 2)")
    load.add_argument(
        "--pipeline",
        action="store_true",
        help="run the whole pipeline meanwhile (--latency, --concurrency) and wait for every "
        "accepted generation to end",
    )
    load.add_argument(
        "--health-count", type=int, default=3000, help="GET /healthz requests (default 3000)"
    )
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests a second, open loop (default: as fast as --clients allow)",
    )
    p.add_argument(
        "--idle-api",
        action="store_true",
        help="idle latency through the service (POST, then its event stream), phase by phase, "
        "without and with the daemon's wake-ups",
    )
    p.add_argument(
        "--idle-samples",
        type=int,
        default=None,
        help="idle-latency samples (default 3; 20 with --idle-api)",
    )
    streams = p.add_argument_group(
        "open event streams (--streams)",
        "what N open event streams cost ai-handler serve (--api-workers) against the idle "
        "service, and how fast one change reaches them all; --users users",
    )
    streams.add_argument(
        "--streams",
        type=int,
        nargs="?",
        const=500,
        default=None,
        metavar="N",
        help="run the streams bench with N streams (500 without N)",
    )
    streams.add_argument(
        "--stream-window",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds of each quiet window, idle and with the streams (default 30)",
    )
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server for the databases")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=cmd_bench)
