"""The emulator runs as its own process and is steered over HTTP, and it carries load.

``python -m ai_handler_dagster.devstack.emulator --port 0 --port-file F`` writes its port when
ready, serves the real client, answers ``/_emulator`` controls through ``EmulatorControl``
(stats, runtime config, predictions, expiry) and exits cleanly on SIGTERM. Under load, hundreds
of concurrent predictions run on timers (the thread count does not grow with them) and
thousands of requests a minute are served.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import replicate

from ai_handler_dagster.devstack.emulator import (
    DEFAULT_TOKEN,
    EmulatorControl,
    read_port_file,
)
from tests.support.emulator import client_for


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """An emulator subprocess and its base URL."""
    port_file = tmp_path / "emulator.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai_handler_dagster.devstack.emulator",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--latency",
            "0.05",
            "--concurrency",
            "4",
            "--seed",
            "3",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        port = read_port_file(port_file, timeout=20)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_process_serves_the_client_and_obeys_controls(
    emulator_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, base_url = emulator_process
    client = replicate.Client(api_token=DEFAULT_TOKEN, base_url=base_url, trust_env=False)
    with EmulatorControl(base_url) as control:
        control.wait_ready()
        ok = client.models.predictions.create(
            model="demo/haiku-text", input={"prompt": "far away"}, wait=10
        )
        assert ok.status == "succeeded"

        config = control.configure(faults={"failure_rate": 1.0}, latency_s=0.02)
        assert config["faults"]["failure_rate"] == 1.0
        assert config["faults"]["seed"] == 3
        assert control.config()["latency_s"] == 0.02
        failed = client.models.predictions.create(
            model="demo/haiku-text", input={"prompt": "doomed"}, wait=10
        )
        assert failed.status == "failed"

        stats = control.stats()
        assert stats["creates"] == 2
        assert stats["final_status"] == {"succeeded": 1, "failed": 1, "canceled": 0}
        assert stats["paid_predictions"] == 2
        audit = control.predictions()
        assert [p["id"] for p in audit] == [ok.id, failed.id]
        assert audit[1]["_emulator"]["faults"] == ["fail"]
        assert control.expire_outputs([ok.id]) == 1
        assert client.predictions.get(ok.id).output is None

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    assert b"listening on " + base_url.encode() in proc.stderr.read()


def test_invalid_settings_exit_with_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ai_handler_dagster.devstack.emulator", "--failure-rate", "3"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"failure_rate" in result.stderr


def test_hundreds_of_concurrent_predictions_on_timers(make_emulator) -> None:
    # Queue everything first (no slots), then open 200 slots at once: the cap is then
    # observable regardless of how fast this machine creates.
    emulator = make_emulator(latency_s=0.5, concurrency=0)
    client = client_for(emulator)
    threads_before = threading.active_count()

    def create(i: int) -> str:
        return client.models.predictions.create(
            model="demo/haiku-text", input={"prompt": f"load {i}"}
        ).id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(create, range(300)))
    started = time.monotonic()
    emulator.configure(concurrency=200)
    stats = emulator.stats()
    assert stats["running"] == 200
    assert stats["queued"] == 100
    assert stats["paid_predictions"] == 200
    # No thread per prediction: only the server's connection threads were added.
    assert threading.active_count() - threads_before < 60

    assert emulator.wait_idle(timeout=10)
    elapsed = time.monotonic() - started
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: client.predictions.get(i).status, ids))
    assert statuses == ["succeeded"] * 300
    assert emulator.stats()["max_running"] == 200
    # Two waves of 0.5 s; timers, not threads, keep this near 1 s.
    assert elapsed < 3


def test_thousands_of_requests_a_minute(emulator, client: replicate.Client) -> None:
    prediction = client.models.predictions.create(model="demo/haiku-text", input={"prompt": "x"})

    def poll(_: int) -> str:
        return client.predictions.get(prediction.id).id

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(poll, range(1000)))
    elapsed = time.monotonic() - started

    assert results == [prediction.id] * 1000
    assert emulator.stats()["requests"]["GET /v1/predictions/{id}"] == 1000
    # 1000 requests well inside a minute (this is several thousand a minute even when slow).
    assert elapsed < 10
