"""The Node.js example (``examples/node/follow_generation.mjs``) against the embedded stack.

The script is run with ``node`` as an app developer would run it, through a recording proxy in
front of the stack's API (``proxy.py``) that cuts its first event streams after one event.
Proves: it submits with the API key, mints a user token, follows the stream with that token
alone (the key never reaches a page route, in a header or the URL), resumes each cut stream
with the ``Last-Event-ID`` of the last event it got, prints every state once and in order
ending with ``succeeded``, and prints output links that download exactly the bytes the
emulator produced; a failed generation and a refused submit exit non-zero with the reason.

Skipped when ``node`` is not on PATH, except in CI (``CI`` set), where that fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import session_scope
from tests.examples.proxy import RecordingProxy
from tests.support.stack import (
    SETTLE_TIMEOUT_S,
    App,
    StackUnderTest,
    predictions_with_prompt,
    running_stack,
    sha256,
    stack_config,
    unique,
)

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "node" / "follow_generation.mjs"
NODE_MAJOR = 20
EVENTS = r"/v1/generations/\d+/events"
STATE = re.compile(r"^state: (\w+) \(event (\d+)\)$", re.MULTILINE)
OUTPUT = re.compile(r"^output: (\S+) \((.+), (\d+) bytes\)$", re.MULTILINE)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def node() -> str:
    """``node`` (20 or later): skipped without it, but never in CI."""
    found = shutil.which("node")
    version = ""
    if found is not None:
        version = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        match = re.match(r"v(\d+)\.", version)
        if match and int(match.group(1)) >= NODE_MAJOR:
            return found
    why = (
        f"node {version} is older than {NODE_MAJOR}" if found else "node is not on PATH"
    ) + f": the Node.js example needs Node {NODE_MAJOR}+"
    if _in_ci():
        pytest.fail(f"{why} (CI is set, so this is not skipped)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackUnderTest]:
    # Keep-alive comments every second: the script has to skip them between the events.
    config = stack_config(
        tmp_path_factory.mktemp("node-example"), extra_env={"AI_HANDLER_API_EVENTS_PING_S": "1"}
    )
    with running_stack(config) as stack:
        app = App(stack.app_db_url)
        try:
            yield StackUnderTest(stack, app)
        finally:
            app.engine.dispose()


@pytest.fixture(scope="module")
def api_key(env: StackUnderTest) -> str:
    """An application's key: read and submit, as a backend would hold it."""
    with session_scope(env.app.engine) as session:
        full, _ = keys.create(session, name="node example", scopes=[keys.READ, keys.SUBMIT])
    return full


def _run(
    node: str, proxy: RecordingProxy, key: str, user: str, model: str, prompt: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(SCRIPT), "--user", user, "--model", model, "--prompt", prompt],
        # Only what the script reads, and PATH: no proxy or other setting of this machine.
        env={
            "PATH": os.environ["PATH"],
            "AI_HANDLER_API_URL": proxy.url,
            "AI_HANDLER_API_KEY": key,
        },
        capture_output=True,
        text=True,
        timeout=SETTLE_TIMEOUT_S,
    )


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


def test_it_follows_a_generation_with_the_user_token_only_and_prints_working_links(
    node: str, env: StackUnderTest, api_key: str
) -> None:
    stack, app = env.stack, env.app
    user = unique("ann")
    prompt = f"a lighthouse at dusk ({user})"
    app.grant(user, 100)
    with RecordingProxy(stack.api_url, drop_streams=2).running() as proxy:
        result = _run(node, proxy, api_key, user, "demo/pixel-sketch", prompt)
    assert result.returncode == 0, _explain(result)

    # Every state once, in order, although two connections were cut along the way.
    printed = STATE.findall(result.stdout)
    assert [state for state, _ in printed] == ["pending", "queued", "running", "succeeded"]

    # The backend's two calls carried the API key; nothing else did.
    [submit] = proxy.requests_to("POST", "/v1/generations")
    [mint] = proxy.requests_to("POST", "/v1/tokens")
    assert (submit.status, mint.status) == (202, 201)
    assert submit.authorization == mint.authorization == f"Bearer {api_key}"
    token = json.loads(mint.body)["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["scope"]) == (user, "read")
    page = [seen for seen in proxy.seen if seen not in (submit, mint)]
    assert page and all(seen.authorization == f"Bearer {token}" for seen in page)
    assert not [seen for seen in page if api_key in seen.query or api_key in seen.path]

    # Three streams: two cut after one event each, each resumed after the last event it got.
    generation_id = json.loads(submit.body)["id"]
    streams = proxy.requests_to("GET", EVENTS)
    assert [seen for seen in page if seen not in streams] == []
    assert {seen.path for seen in streams} == {f"/v1/generations/{generation_id}/events"}
    assert [(s.status, s.dropped, len(s.event_ids)) for s in streams] == [
        (200, True, 1),
        (200, True, 1),
        (200, False, 2),
    ]
    assert [s.last_event_id for s in streams] == [
        None,
        streams[0].event_ids[-1],
        streams[1].event_ids[-1],
    ]
    assert [event_id for _, event_id in printed] == [i for s in streams for i in s.event_ids]
    assert result.stderr.count("resuming after event") == 2

    # The printed link downloads the stored object: the bytes the emulator produced.
    row = app.row(generation_id)
    assert row.status == "succeeded" and len(row.outputs or []) == 1
    [(url, content_type, size)] = OUTPUT.findall(result.stdout)
    downloaded = httpx.get(url, timeout=30, trust_env=False)
    assert downloaded.status_code == 200, downloaded.text
    assert content_type == "image/png" == downloaded.headers["content-type"]
    assert downloaded.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(downloaded.content) == int(size) == row.outputs[0]["size"]  # type: ignore[index]
    assert sha256(downloaded.content) == row.outputs[0]["sha256"]  # type: ignore[index]
    [prediction] = predictions_with_prompt(stack, prompt)
    [produced_url] = prediction["output"]
    produced = httpx.get(produced_url, timeout=30, trust_env=False)
    assert produced.status_code == 200 and produced.content == downloaded.content


def test_a_failed_generation_exits_non_zero_with_its_error_and_refund(
    node: str, env: StackUnderTest, api_key: str
) -> None:
    user = unique("bob")
    env.app.grant(user, 100)
    with RecordingProxy(env.stack.api_url).running() as proxy:
        result = _run(node, proxy, api_key, user, "demo/pixel-sketch", f"a robot [fail] {user}")
    assert result.returncode == 1, _explain(result)
    states = [state for state, _ in STATE.findall(result.stdout)]
    assert states[0] == "pending" and states[-1] == "failed", _explain(result)
    assert re.search(
        r"^error: generation \d+ failed: prediction_failed: .* \(refunded\)$",
        result.stderr,
        re.MULTILINE,
    ), _explain(result)
    assert OUTPUT.findall(result.stdout) == []
    assert env.app.balance(user).available == 100


def test_a_refused_submit_exits_non_zero_with_the_problem_and_follows_nothing(
    node: str, env: StackUnderTest, api_key: str
) -> None:
    user = unique("carol")  # no credits: 402
    with RecordingProxy(env.stack.api_url).running() as proxy:
        result = _run(node, proxy, api_key, user, "demo/pixel-sketch", "a fox")
    assert result.returncode == 1, _explain(result)
    assert re.search(r"^error: .*/v1/generations: 402 ", result.stderr, re.MULTILINE), _explain(
        result
    )
    assert [(s.method, s.path) for s in proxy.seen] == [("POST", "/v1/generations")]
    assert STATE.findall(result.stdout) == []
