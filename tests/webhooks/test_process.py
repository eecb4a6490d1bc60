"""The receiver as a process and as CLI commands.

Proves: ``python -m ai_handler_dagster.webhooks --port 0 --port-file F`` reads the database URL
and the secret from the environment, writes its port once it accepts connections, records a
signed delivery, never prints the secret, and exits 0 on SIGTERM; without a secret, or with a
malformed one, it exits 2 naming the variable but not the value; ``register`` adds
``webhooks serve`` and ``webhooks prune`` to a CLI parser, and ``prune`` deletes old rows.
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
from ai_handler_dagster.webhooks import __main__ as entry_point
from ai_handler_dagster.webhooks.commands import cmd_prune, cmd_serve, register
from tests.support.webhooks import SECRET, prediction, signed, state_of


def _env(db_url: str, secret: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_HANDLER_")}
    env["AI_HANDLER_DATABASE_URL"] = db_url
    if secret is not None:
        env["AI_HANDLER_WEBHOOK_SECRET"] = secret
    return env


def test_process_serves_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    db.upgrade(url)
    port_file = tmp_path / "webhooks.port"
    command = ["-m", "ai_handler_dagster.webhooks", "--port", "0", "--port-file", str(port_file)]
    proc = subprocess.Popen(
        [sys.executable, *command],
        env=_env(url, SECRET),
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
        assert answer.status_code == 204
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"listening on http://127.0.0.1:{port}{WEBHOOK_PATH}" in err
    assert SECRET not in out + err
    assert SECRET.removeprefix("whsec_") not in out + err
    assert state_of(make_engine(url), "p1") == ("succeeded", prediction("p1", "succeeded"))


@pytest.mark.parametrize(
    ("secret", "message"),
    [(None, "must be set"), ("whsec_***not-base64***", "not 'whsec_' followed by base64")],
)
def test_refuses_to_start_without_a_usable_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secret: str | None,
    message: str,
) -> None:
    # In process (the entry point's main), to spare a second interpreter start.
    for name, value in _env(f"sqlite:///{tmp_path / 'app.db'}", secret).items():
        monkeypatch.setenv(name, value)
    if secret is None:
        monkeypatch.delenv("AI_HANDLER_WEBHOOK_SECRET", raising=False)
    assert entry_point.main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "AI_HANDLER_WEBHOOK_SECRET" in err and message in err
    if secret:
        assert secret not in err


def test_register_adds_serve_and_prune(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="ai-handler")
    register(parser.add_subparsers(dest="command", required=True))
    serve = parser.parse_args(["webhooks", "serve", "--port", "0", "--host", "0.0.0.0"])
    assert (serve.handler, serve.port, serve.host, serve.tolerance) == (
        cmd_serve,
        0,
        "0.0.0.0",
        300,
    )

    url = f"sqlite:///{tmp_path / 'app.db'}"
    db.upgrade(url)
    engine = make_engine(url)
    record_delivery(engine, "old", prediction("p_old"), now=utcnow() - timedelta(hours=100))
    record_delivery(engine, "new", prediction("p_new"))
    prune = parser.parse_args(["webhooks", "prune", "--url", url, "--older-than-hours", "72"])
    assert prune.handler(prune) == 0
    assert prune.handler is cmd_prune
    assert state_of(engine, "p_old") is None
    assert state_of(engine, "p_new") is not None
