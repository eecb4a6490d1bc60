"""Dagster's own commands work in the repository root, as in any Dagster project.

Regression: ``dagster dev`` and ``dagster definitions validate`` in the root stopped at once with
"DAGSTER_PG_URL ... is not set", because Dagster reads the root ``dagster.yaml``, which named
production's PostgreSQL storage. The file now holds every setting but storage.
``dagster dev`` is also checked to tick its sensors cleanly on a fresh state folder (no
``ai-handler db upgrade`` first, no Replicate token: nothing calls the provider while idle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ai_handler_dagster.devstack.stack import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _root_env(state: Path) -> dict[str, str]:
    """A user's shell in a fresh clone: no DAGSTER_HOME, no stack variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "AI_HANDLER_"))}
    env.pop("REPLICATE_API_TOKEN", None)
    env.pop("REPLICATE_BASE_URL", None)
    return {**env, "AI_HANDLER_STATE_DIR": str(state), "DAGSTER_DISABLE_TELEMETRY": "1"}


@pytest.mark.parametrize(
    "command",
    [["dagster", "definitions", "validate", "-w", "workspace.yaml"], ["dg", "check", "defs"]],
    ids=["definitions-validate", "dg-check-defs"],
)
def test_validation_passes_in_the_root(tmp_path: Path, command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        env=_root_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DAGSTER_PG_URL" not in done.stdout + done.stderr


SENSOR_TICKS = """
query { sensorsOrError(repositorySelector:
  {repositoryLocationName: "ai_handler", repositoryName: "__repository__"}) {
  ... on Sensors { results { name sensorState { ticks(limit: 5) { status error { message } } } } }
  ... on PythonError { message } } }
"""


@pytest.mark.slow
def test_dagster_dev_serves_and_ticks_in_the_root(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=_root_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, 120, proc)
        deadline = time.monotonic() + 120
        ticks: dict[str, list[dict[str, object]]] = {}
        while time.monotonic() < deadline:
            answer = httpx.post(
                f"http://127.0.0.1:{port}/graphql", json={"query": SENSOR_TICKS}, timeout=30
            ).json()
            results = (answer.get("data") or {}).get("sensorsOrError", {}).get("results") or []
            ticks = {r["name"]: r["sensorState"]["ticks"] for r in results}
            if len(ticks) == 3 and all(ticks.values()):
                break
            time.sleep(1)
        assert set(ticks) == {
            "generation_request_sensor",
            "refund_failed_runs",
            "refund_canceled_runs",
        }, json.dumps(ticks)
        for name, recent in ticks.items():
            assert recent, f"{name} never ticked"
            assert all(t["status"] != "FAILURE" for t in recent), (name, recent)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
