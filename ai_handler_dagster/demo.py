"""``ai-handler demo``: the main job end to end, headless, on the embedded stack.

Starts the stack (emulator, local S3, the HTTP API that receives the webhooks, Dagster daemon)
and prints the API's URL and a key valid while the demo runs. Then it works as an application
does, through the API with that key: grants a demo user credits, submits a set of generations
(two of which the emulator fails on purpose), follows each through its event stream (resuming a
dropped one with ``Last-Event-ID``) while showing progress, reads the user's credits and
statement, and downloads every output through its link. It prints a summary, checks the ledger's
invariants in the app database and each download against the size and sha256 recorded for it,
and stops everything. Exits non-zero if any expectation is off.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import aconnect_sse

from ai_handler_dagster import ledger, settings
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.domain import TERMINAL, UNSUCCESSFUL, GenerationStatus
from ai_handler_dagster.errors import AiHandlerError
from ai_handler_dagster.settings import DEFAULT_BUCKET

DEMO_CREDITS = 500

#: (model, input, expected status): the emulator fails any prompt containing "[fail]".
DEMO_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("demo/pixel-sketch", {"prompt": "a lighthouse at dusk", "seed": 1}, "succeeded"),
    (
        "demo/pixel-sketch",
        {"prompt": "a red fox in snow", "width": 320, "height": 192},
        "succeeded",
    ),
    ("demo/pixel-sketch", {"prompt": "two moons", "num_outputs": 2, "seed": 7}, "succeeded"),
    ("demo/haiku-text", {"prompt": "autumn rain on a tin roof"}, "succeeded"),
    ("demo/haiku-text", {"prompt": "the sea at night", "max_tokens": 32}, "succeeded"),
    ("demo/pixel-sketch", {"prompt": "a glitching robot [fail]"}, "failed"),
    ("demo/haiku-text", {"prompt": "a poem that breaks [fail]"}, "failed"),
    ("demo/pixel-sketch", {"prompt": "a paper boat on a pond", "seed": 3}, "succeeded"),
]


@dataclass
class DemoResult:
    submitted: int
    succeeded: int
    failed: int
    refunded: int
    credits_before: int
    credits_after: int
    credits_charged: int
    ledger_violations: int
    s3_objects: int
    s3_checksum_errors: int
    unexpected: list[str]
    wall_s: float

    @property
    def ok(self) -> bool:
        return not self.unexpected

    def to_json(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "refunded": self.refunded,
            "credits_before": self.credits_before,
            "credits_after": self.credits_after,
            "credits_charged": self.credits_charged,
            "ledger_violations": self.ledger_violations,
            "s3_objects": self.s3_objects,
            "s3_checksum_errors": self.s3_checksum_errors,
            "wall_s": round(self.wall_s, 1),
            "ok": self.ok,
            "problems": self.unexpected,
        }


def _progress(done: int, total: int, elapsed: float, stream: Any, last: list[int]) -> None:
    """A progress bar redrawn in place on a terminal; one line per change otherwise."""
    tty = stream.isatty()
    if not tty and last and last[0] == done:
        return
    last[:] = [done]
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    line = f"  [{bar}] {done}/{total} settled  {elapsed:5.1f}s"
    stream.write(f"\r{line}" if tty else f"{line}\n")
    stream.flush()


@dataclass
class Followed:
    """One generation as the demo saw it through the API: what it submitted, then its stream."""

    id: int
    model: str
    expected: str
    #: Every state its event stream sent, in order.
    states: list[str] = field(default_factory=list)
    #: The terminal status, and what its event said; None until it has ended.
    status: str | None = None
    error_code: str | None = None
    charged: int = 0
    refunded: bool | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    #: Why following it stopped before its end (a refusal, too many dropped connections).
    error: str | None = None

    def end(self, outcome: dict[str, Any]) -> None:
        """Record the terminal event's outcome (``GET /v1/generations/{id}`` has the same
        fields, all but ``refunded``)."""
        self.status = outcome["status"]
        self.error_code = outcome.get("error_code")
        self.charged = int(outcome["credits"]["charged"] or 0)
        unsuccessful = self.status != GenerationStatus.SUCCEEDED
        self.refunded = outcome.get("refunded", unsuccessful and self.charged == 0)
        self.outputs = list(outcome.get("outputs") or [])


@dataclass
class _Seen:
    """What the demo read through the API besides the streams."""

    followed: list[Followed]
    balance: int
    held: int
    refunded: int
    s3_objects: int
    checksum_errors: int


#: Told the generations after they are submitted (``None``), then how many have ended.
Progress = Callable[[list[Followed], int | None], None]

#: Connections of one event stream that may drop before the demo gives up on it.
MAX_RECONNECTS = 5


class DemoError(AiHandlerError, RuntimeError):
    """The API refused something the demo needs (a grant, a submit, a read)."""


def _expect(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        raise DemoError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}, expected {status}: {response.text[:500]}"
        )
    return response.json()


async def _follow(client: httpx.AsyncClient, generation: Followed) -> None:
    """Follow the generation's event stream until its terminal event; a dropped connection is
    resumed after the last event received."""
    path = f"/v1/generations/{generation.id}/events"
    last: str | None = None
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            async with aconnect_sse(client, "GET", path, headers=headers) as source:
                if source.response.status_code == 204:
                    # It ended right after the last event received: the generation says how.
                    view = await client.get(f"/v1/generations/{generation.id}")
                    generation.end(_expect(view, 200))
                    return
                if source.response.status_code != 200:
                    await source.response.aread()
                    _expect(source.response, 200)
                async for event in source.aiter_sse():
                    if not event.data:
                        # A keep-alive comment, which httpx-sse passes on as an empty
                        # "message" once the stream has an id; the SSE rules drop it.
                        continue
                    last = event.id or last
                    generation.states.append(event.event)
                    if event.event in TERMINAL:
                        generation.end(json.loads(event.data))
                        return
        except httpx.TransportError:
            pass  # dropped: resume below
        generation.reconnects += 1
        if generation.reconnects > MAX_RECONNECTS:
            raise DemoError(f"{path}: dropped {generation.reconnects} times")
        await asyncio.sleep(0.5 * generation.reconnects)


async def _drive(api_url: str, key: str, user: str, *, timeout_s: float, show: Progress) -> _Seen:
    """Everything the demo does through the API, as an application would."""
    auth = {"Authorization": f"Bearer {key}"}
    timeout = httpx.Timeout(30, read=2 * settings.api_events_ping_s() + 30)
    async with (
        httpx.AsyncClient(base_url=api_url, headers=auth, timeout=timeout, trust_env=False) as api,
        # Output links are presigned: they need no key, and must not be sent one.
        httpx.AsyncClient(timeout=30, trust_env=False) as links,
    ):
        grant = {"amount": DEMO_CREDITS, "reason": "demo"}
        answer = await api.post(
            f"/v1/users/{user}/grants", json=grant, headers={"Idempotency-Key": f"demo:{user}"}
        )
        _expect(answer, 201)
        followed = []
        for index, (model, payload, expected) in enumerate(DEMO_REQUESTS):
            answer = await api.post(
                "/v1/generations",
                json={"user": user, "model": model, "input": payload},
                headers={"Idempotency-Key": f"demo:{user}:{index}"},
            )
            followed.append(Followed(_expect(answer, 202)["id"], model, expected))
        show(followed, None)

        tasks = {asyncio.create_task(_follow(api, g)): g for g in followed}
        deadline = time.monotonic() + timeout_s
        pending = set(tasks)
        while pending and time.monotonic() < deadline:
            _, pending = await asyncio.wait(
                pending, timeout=min(0.5, max(deadline - time.monotonic(), 0))
            )
            show(followed, sum(g.status is not None for g in followed))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task, generation in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                generation.error = str(task.exception())

        credits = _expect(await api.get(f"/v1/users/{user}/credits"), 200)
        statement = _expect(await api.get(f"/v1/users/{user}/ledger", params={"limit": 500}), 200)
        released = sum(entry["kind"] == "release" for entry in statement["entries"])

        s3_objects = checksum_errors = 0
        for generation in followed:
            for output in generation.outputs:
                answer = await links.get(output["url"])
                s3_objects += 1
                body = answer.content
                digest = hashlib.sha256(body).hexdigest()
                if answer.status_code != 200 or (digest, len(body)) != (
                    output["sha256"],
                    output["size"],
                ):
                    checksum_errors += 1
    return _Seen(
        followed, credits["balance"], credits["held"], released, s3_objects, checksum_errors
    )


def run_demo(
    *, state_dir: Path | None = None, timeout_s: float = 300, quiet: bool = False
) -> DemoResult:
    """Run the demo; returns what happened (``DemoResult.ok`` says if it is all as expected)."""
    out = sys.stderr
    # A folder of its own, so the demo can run beside `ai-handler dev` without sharing its queue.
    config = StackConfig(
        state_dir=state_dir or settings.state_dir() / "demo", latency_s=1.0, concurrency=8
    )
    started = time.monotonic()
    stack = Stack(config)
    if not quiet:
        out.write(f"Starting the embedded stack in {config.state_dir} ...\n")
    with stack:
        key = stack.local_api_key()
        if not quiet:
            out.write(f"  HTTP API            {stack.api_url}\n")
            out.write(f"  API key (admin)     {key} (valid while the demo runs)\n")
            out.write(f"  Replicate emulator  {stack.emulator_url}\n")
            out.write(f"  local S3            {stack.s3_url} (bucket {DEFAULT_BUCKET})\n")
            out.write(f"  Dagster instance    {stack.dagster_home}\n")
            out.write(f"  logs                {stack.logs_dir}\n")
        user = f"demo-{uuid.uuid4().hex[:8]}"
        last: list[int] = []

        def show(followed: list[Followed], done: int | None) -> None:
            if quiet:
                return
            if done is None:
                out.write(
                    f"Submitted {len(followed)} generations for {user} through the API; "
                    "following their event streams\n"
                )
            else:
                _progress(done, len(followed), time.monotonic() - started, out, last)

        seen = asyncio.run(_drive(stack.api_url, key, user, timeout_s=timeout_s, show=show))
        if not quiet and out.isatty():
            out.write("\n")
        with session_scope(make_engine(stack.app_db_url)) as session:
            violations = ledger.verify(session)

    followed = seen.followed
    charged = sum(g.charged for g in followed)
    problems: list[str] = []
    for g in followed:
        if g.error is not None:
            problems.append(f"generation {g.id}: following its events failed: {g.error}")
        elif g.status is None:
            state = g.states[-1] if g.states else "no event"
            problems.append(f"generation {g.id} did not end within {timeout_s:.0f}s ({state})")
        elif g.status != g.expected:
            problems.append(
                f"generation {g.id} ended {g.status} ({g.error_code}), expected {g.expected}"
            )
        if g.states and g.states[0] != GenerationStatus.PENDING:
            problems.append(f"the event stream of generation {g.id} began with {g.states[0]}")
        if g.status == GenerationStatus.SUCCEEDED and not g.outputs:
            problems.append(f"generation {g.id} succeeded without outputs")
        if g.status in UNSUCCESSFUL and not g.refunded:
            problems.append(f"generation {g.id} ended {g.status} without a refund")
    if violations:
        problems.extend(str(v) for v in violations)
    if seen.balance != DEMO_CREDITS - charged:
        problems.append(f"balance {seen.balance} != {DEMO_CREDITS} - charged {charged}")
    if seen.held != 0:
        problems.append(f"{seen.held} credits still held")
    if seen.checksum_errors:
        problems.append(
            f"{seen.checksum_errors} outputs did not download as recorded (size, sha256)"
        )

    result = DemoResult(
        submitted=len(followed),
        succeeded=sum(g.status == GenerationStatus.SUCCEEDED for g in followed),
        failed=sum(g.status in UNSUCCESSFUL for g in followed),
        refunded=seen.refunded,
        credits_before=DEMO_CREDITS,
        credits_after=seen.balance,
        credits_charged=charged,
        ledger_violations=len(violations),
        s3_objects=seen.s3_objects,
        s3_checksum_errors=seen.checksum_errors,
        unexpected=problems,
        wall_s=time.monotonic() - started,
    )
    if not quiet:
        _print_summary(followed, result, out)
    return result


def _print_summary(followed: list[Followed], result: DemoResult, out: Any) -> None:
    out.write("\n  id  model               status     charged  error / outputs\n")
    for g in followed:
        # The object each output's link points to: its path, less the stack's bucket.
        paths = (urlsplit(o["url"]).path.lstrip("/") for o in g.outputs)
        links = ", ".join(p.removeprefix(f"{DEFAULT_BUCKET}/") for p in paths)
        detail = g.error_code or links
        out.write(f"  {g.id:<3} {g.model:<19} {g.status or '-':<10} {g.charged:>7}  {detail}\n")
    out.write(
        f"\n  {result.succeeded} succeeded, {result.failed} failed ({result.refunded} refunded); "
        f"credits {result.credits_before} -> {result.credits_after}; "
        f"{result.s3_objects} S3 objects; ledger violations: {result.ledger_violations}\n"
    )
    if result.unexpected:
        out.write("  PROBLEMS:\n" + "".join(f"   - {p}\n" for p in result.unexpected))
    else:
        out.write(f"  All as expected ({result.wall_s:.0f}s).\n")


def main_demo(*, json_output: bool, timeout_s: float) -> int:
    result = run_demo(timeout_s=timeout_s, quiet=False)
    if json_output:
        print(json.dumps(result.to_json()))
    return 0 if result.ok else 1
