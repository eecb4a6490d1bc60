"""``ai-handler bench --idle-api``: what a person waiting for one image waits, through the service.

One generation at a time into an idle stack (PostgreSQL, the repository's own settings), the way
an application sends it: ``POST /v1/generations`` with a key, then its event stream
(``GET /v1/generations/{id}/events``) until the terminal event. Each sample is split into phases:

- ``submit``: the ``POST`` until its answer (202);
- ``sensor``: the answer until Dagster queued the run (``RUN_ENQUEUED``; the request sensor's
  tick, its claim and the run's creation);
- ``dequeue``: queued until ``STARTING`` (the run queue's read);
- ``launch``: ``STARTING`` until the run worker runs (the warm fork);
- each op's duration, ``gaps`` (between ops) and ``after_ops`` (as ``bench.idle_phases``);
- ``to_create``: the ``POST`` until the provider got the create (the emulator's record);
- ``to_terminal``: the ``POST`` until the stream's terminal event arrived;
- ``overhead``: ``to_terminal`` minus the model's latency (``--latency``).

It runs twice on fresh stacks, without and with the daemon's wake-ups (``runtime/wake.py``,
``AI_HANDLER_SENSOR_WAKE``), and reports p50 and p95 of each phase for both and their ratios;
the first sample of each is a warm-up and is not counted.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from ai_handler_dagster import ledger
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.devstack.emulator import EmulatorControl
from ai_handler_dagster.devstack.stack import StackConfig
from ai_handler_dagster.domain import TERMINAL
from ai_handler_dagster.proving.bench import idle_phases
from ai_handler_dagster.proving.stack import ProvingStack, scratch_databases

MODEL = "demo/pixel-sketch"
USER = "idle-api-user"
#: The phases reported, in order; between ``launch`` and ``to_create`` each op's own and the
#: gaps between ops (``bench.idle_phases``).
PHASES = (
    "submit",
    "sensor",
    "dequeue",
    "launch",
    "reserve_credits",
    "create_predictions",
    "await_predictions",
    "store_outputs",
    "finalize",
    "gaps",
    "after_ops",
    "to_create",
    "to_terminal",
    "overhead",
)


@dataclass
class IdleApiConfig:
    pg_admin_url: str
    samples: int = 20
    latency: float = 2.0
    progress: bool = True


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _created_at(emulator: EmulatorControl, prompt: str) -> float | None:
    for prediction in emulator.predictions():
        if (prediction.get("input") or {}).get("prompt") == prompt:
            return datetime.fromisoformat(prediction["created_at"]).astimezone(UTC).timestamp()
    return None


def _sample(
    client: httpx.Client, emulator: EmulatorControl, instance: Any, engine: Any, index: int
) -> dict[str, float]:
    prompt = f"idle-api {index} {uuid.uuid4().hex[:8]}"
    body = {"user": USER, "model": MODEL, "input": {"prompt": prompt, "width": 64, "height": 64}}
    sent = time.time()
    answer = client.post("/v1/generations", json=body)
    answered = time.time()
    answer.raise_for_status()
    generation_id = int(answer.json()["id"])
    terminal_at = None
    last = None
    with connect_sse(client, "GET", f"/v1/generations/{generation_id}/events") as stream:
        for event in stream.iter_sse():
            last = event.event
            if event.event in TERMINAL:
                terminal_at = time.time()
                break
    if terminal_at is None or last != "succeeded":
        raise RuntimeError(f"generation {generation_id} ended {last!r}, not succeeded")
    created = _created_at(emulator, prompt)
    phases = idle_phases(instance, engine, generation_id)
    if created is None or not phases:
        raise RuntimeError(f"generation {generation_id}: no create or no run events recorded")
    return {
        **phases,
        "submit": answered - sent,
        # idle_phases counts the sensor from the row's creation, inside the POST.
        "sensor": phases["sensor"] - (answered - _row_created(engine, generation_id)),
        "to_create": created - sent,
        "to_terminal": terminal_at - sent,
    }


def _row_created(engine: Any, generation_id: int) -> float:
    from ai_handler_dagster.db.models import Generation

    with session_scope(engine) as session:
        row = session.get(Generation, generation_id)
        assert row is not None
        return row.created_at.timestamp()


def _run(config: IdleApiConfig, wake: bool) -> list[dict[str, float]]:
    say = (lambda text: sys.stderr.write(text + "\n")) if config.progress else (lambda text: None)
    state = Path(tempfile.mkdtemp(prefix="ai-handler-idle-api-"))
    with contextlib.ExitStack() as cleanup:
        app_url, dagster_url = cleanup.enter_context(
            scratch_databases(config.pg_admin_url, "aih_idle")
        )
        stack = ProvingStack(
            StackConfig(
                state_dir=state,
                storage="postgres",
                dagster_pg_url=dagster_url,
                app_db_url=app_url,
                latency_s=config.latency,
                extra_env={"AI_HANDLER_SENSOR_WAKE": "1" if wake else "0"},
            )
        )
        cleanup.enter_context(stack)
        engine = make_engine(app_url)
        with session_scope(engine) as session:
            ledger.grant(session, USER, 10**9, key=f"idle-api-grant:{USER}")
        headers = {"Authorization": f"Bearer {stack.local_api_key()}"}
        from dagster import DagsterInstance

        samples: list[dict[str, float]] = []
        with (
            DagsterInstance.from_config(str(stack.dagster_home)) as instance,
            EmulatorControl(stack.emulator_url) as emulator,
            httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as client,
        ):
            for index in range(config.samples + 1):
                sample = _sample(client, emulator, instance, engine, index)
                sample["overhead"] = sample["to_terminal"] - config.latency
                if index > 0:  # the first one also waits for the daemon's first tick
                    samples.append(sample)
                say(f"[wake {'on' if wake else 'off'}] {index}: " + json.dumps(_rounded(sample)))
        return samples


def _rounded(sample: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in sample.items()}


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 and p95 of each phase, in seconds."""
    return {
        phase: {
            "p50": round(_percentile([s[phase] for s in samples], 0.5), 3),
            "p95": round(_percentile([s[phase] for s in samples], 0.95), 3),
        }
        for phase in PHASES
        if all(phase in s for s in samples)
    }


def run_idle_api(config: IdleApiConfig) -> dict[str, Any]:
    before = summarize(_run(config, wake=False))
    after = summarize(_run(config, wake=True))
    ratios = {
        phase: {
            q: round(after[phase][q] / before[phase][q], 3) if before[phase][q] > 0 else None
            for q in ("p50", "p95")
        }
        for phase in PHASES
        if phase in before and phase in after
    }
    return {
        "samples": config.samples,
        "latency_s": config.latency,
        "wake_off": before,
        "wake_on": after,
        "on_over_off": ratios,
    }


def print_report(report: dict[str, Any]) -> None:
    """Both runs as one table, seconds."""
    print(
        f"idle latency through the service: {report['samples']} samples each, "
        f"model {report['latency_s']} s"
    )
    print(
        f"{'phase':20}{'off p50':>10}{'off p95':>10}{'on p50':>10}{'on p95':>10}{'p50 on/off':>12}"
    )
    for phase in report["on_over_off"]:
        off, on = report["wake_off"][phase], report["wake_on"][phase]
        ratio = report["on_over_off"][phase]["p50"]
        print(
            f"{phase:20}{off['p50']:>10.3f}{off['p95']:>10.3f}{on['p50']:>10.3f}"
            f"{on['p95']:>10.3f}{'-' if ratio is None else ratio:>12}"
        )
