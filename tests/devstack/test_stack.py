"""The embedded stack's own guards, and its HTTP API.

Regression: two stacks in one state folder (``ai-handler dev`` and ``ai-handler demo``) shared the
app database, so one stack's daemon claimed the other's requests and stored their outputs in its
own S3; a second stack on a folder now stops with a clear error and the first is unaffected.

The stack runs ``ai-handler serve``: it answers at ``api_url``; creates are given
``<api url>/webhooks/replicate`` (``AI_HANDLER_WEBHOOK_URL``) and the emulator's signed webhooks
land in ``prediction_states``; the local key works on the API while the stack runs, is shown
once, and is revoked when the stack stops. Without webhooks the API still runs, creates ask for
none and the webhook route accepts nothing (503).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import replicate

from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.devstack.stack import EMULATOR_TOKEN, Stack, StackConfig
from ai_handler_dagster.settings import ConfigError
from tests.support.webhooks import prediction, signed, state_of


def test_one_stack_per_state_folder(tmp_path: Path) -> None:
    first = Stack(StackConfig(state_dir=tmp_path))
    first._prepare()
    try:
        second = Stack(StackConfig(state_dir=tmp_path))
        with pytest.raises(ConfigError, match="another embedded stack"):
            second._prepare()
        # A different folder is fine.
        other = Stack(StackConfig(state_dir=tmp_path / "other"))
        other._prepare()
        other.stop()
    finally:
        first.stop()
    # Once the first one stopped, the folder is free again.
    third = Stack(StackConfig(state_dir=tmp_path))
    third._prepare()
    third.stop()


def _wait_terminal(stack: Stack, pid: str, timeout_s: float = 30) -> str:
    engine = make_engine(stack.app_db_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = state_of(engine, pid)
        if found is not None and found[0] in ("succeeded", "failed", "canceled"):
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no terminal webhook state for {pid} after {timeout_s:.0f}s")


def test_the_stack_serves_the_api_and_receives_webhooks_on_it(tmp_path: Path) -> None:
    from ai_handler_dagster.api import keys

    stack = Stack(StackConfig(state_dir=tmp_path, daemon=False, latency_s=0.2))
    with stack:
        assert stack.webhook_url == stack.api_url + "/webhooks/replicate"
        assert stack.env()["AI_HANDLER_WEBHOOK_URL"] == stack.webhook_url
        key = stack.local_api_key()
        with pytest.raises(RuntimeError, match="shown once"):
            stack.local_api_key()
        with httpx.Client(base_url=stack.api_url, trust_env=False, timeout=10) as http:
            assert http.get("/readyz").json() == {"status": "ready"}
            me = http.get("/v1/key", headers={"Authorization": f"Bearer {key}"})
            assert me.status_code == 200 and me.json()["scopes"] == ["admin"]
        client = replicate.Client(
            api_token=EMULATOR_TOKEN, base_url=stack.emulator_url, trust_env=False
        )
        made = client.models.predictions.create(
            model="demo/haiku-text", input={"prompt": "harbour"}, webhook=stack.webhook_url
        )
        assert _wait_terminal(stack, made.id) == "succeeded"
    # Stopped: the key is revoked (the database outlives the stack).
    with session_scope(make_engine(stack.app_db_url)) as session:
        assert keys.authenticate(session, key) is None
        [info] = keys.list_keys(session)
        assert info.name == "local operator" and info.revoked_at is not None


def test_without_webhooks_the_api_runs_and_accepts_none(tmp_path: Path) -> None:
    stack = Stack(StackConfig(state_dir=tmp_path, daemon=False, webhooks=False))
    with stack:
        assert stack.webhook_url == ""
        # Creates name no webhook of this stack (the variable may come from the environment).
        assert stack.env().get("AI_HANDLER_WEBHOOK_URL") != stack.api_url + "/webhooks/replicate"
        headers, body = signed(prediction("p1"))
        with httpx.Client(base_url=stack.api_url, trust_env=False, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            refused = http.post("/webhooks/replicate", content=body, headers=headers)
        assert refused.status_code == 503
        assert state_of(make_engine(stack.app_db_url), "p1") is None
