"""Webhooks on ``ai-handler serve`` as a process, and the ``webhooks`` CLI command.

Proves: ``ai-handler serve --port 0 --port-file F`` with ``AI_HANDLER_WEBHOOK_SECRET`` in its
environment records a signed delivery, never prints the secret, and shuts down cleanly on SIGTERM;
``register`` adds ``webhooks prune`` (and no longer a receiver of its own: ``webhooks serve`` is
a usage error), and ``prune`` deletes old rows.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from ai_handler_dagster import db
from ai_handler_dagster.db.engine import make_engine
from ai_handler_dagster.db.models import utcnow
from ai_handler_dagster.devstack.emulator import read_port_file
from ai_handler_dagster.webhooks import WEBHOOK_PATH, record_delivery
from ai_handler_dagster.webhooks.commands import cmd_prune, register
from ai_handler_dagster.webhooks.config import SECRET_VAR
from tests.support.webhooks import SECRET, prediction, signed, state_of


def test_serve_receives_webhooks_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    db.upgrade(url)
    port_file = tmp_path / "api.port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_HANDLER_")}
    env.update({"AI_HANDLER_DATABASE_URL": url, SECRET_VAR: SECRET})
    command = [
        "-m",
        "ai_handler_dagster.cli",
        "serve",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    proc = subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_port_file(port_file, timeout=30)
        headers, body = signed(prediction("p1", "succeeded"), msg_id="msg_proc")
        with httpx.Client(trust_env=False, timeout=10) as http:
            answer = http.post(
                f"http://127.0.0.1:{port}{WEBHOOK_PATH}", content=body, headers=headers
            )
        assert answer.status_code == 204, answer.text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn shuts down cleanly, then re-raises the signal it caught (exit 128 + SIGTERM).
    assert proc.returncode in (0, 128 + signal.SIGTERM), err
    assert "Application shutdown complete" in err
    assert SECRET not in out + err
    assert SECRET.removeprefix("whsec_") not in out + err
    assert state_of(make_engine(url), "p1") == ("succeeded", prediction("p1", "succeeded"))


def test_register_adds_prune_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ai-handler")
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["webhooks", "serve"])
    assert "invalid choice: 'serve'" in capsys.readouterr().err

    url = f"sqlite:///{tmp_path / 'app.db'}"
    db.upgrade(url)
    engine = make_engine(url)
    record_delivery(engine, "old", prediction("p_old"), now=utcnow() - timedelta(hours=100))
    record_delivery(engine, "new", prediction("p_new"))
    prune = parser.parse_args(["webhooks", "prune", "--url", url, "--older-than-hours", "72"])
    assert prune.handler is cmd_prune
    assert prune.handler(prune) == 0
    assert state_of(engine, "p_old") is None
    assert state_of(engine, "p_new") is not None
