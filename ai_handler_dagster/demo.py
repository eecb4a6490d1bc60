"""``ai-handler demo``: the main job end to end, headless, on the embedded stack.

Starts the stack (emulator, local S3, the HTTP API that receives the webhooks, Dagster daemon),
prints the API's URL and a key valid while the demo runs, grants a demo user credits, submits a
set of generations (two of which the emulator fails on purpose), waits for every one to settle
while showing progress, prints a summary, checks the ledger and the S3 objects, and stops
everything. Exits non-zero if any expectation is off.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger, settings
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.devstack.stack import Stack, StackConfig
from ai_handler_dagster.domain import TERMINAL, UNSUCCESSFUL, GenerationStatus
from ai_handler_dagster.pricing import load_pricing
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
        stack.apply_env()
        key = stack.local_api_key()
        if not quiet:
            out.write(f"  HTTP API            {stack.api_url}\n")
            out.write(f"  API key (admin)     {key} (valid while the demo runs)\n")
            out.write(f"  Replicate emulator  {stack.emulator_url}\n")
            out.write(f"  local S3            {stack.s3_url} (bucket {DEFAULT_BUCKET})\n")
            out.write(f"  Dagster instance    {stack.dagster_home}\n")
            out.write(f"  logs                {stack.logs_dir}\n")
        engine = make_engine(stack.app_db_url)
        prices = load_pricing()
        user = f"demo-{uuid.uuid4().hex[:8]}"
        with session_scope(engine) as session:
            ledger.grant(session, user, DEMO_CREDITS, key=f"demo-grant:{user}")
        ids: dict[int, str] = {}
        with session_scope(engine) as session:
            for index, (model, payload, expected) in enumerate(DEMO_REQUESTS):
                row = gens.submit(
                    session,
                    user_id=user,
                    model=model,
                    input=payload,
                    request_id=f"{user}:{index}",
                    prices=prices,
                )
                ids[row.id] = expected
        if not quiet:
            out.write(f"Submitted {len(ids)} generations for {user}; waiting for them to settle\n")

        deadline = time.monotonic() + timeout_s
        rows: list[Generation] = []
        last: list[int] = []
        while True:
            with session_scope(engine) as session:
                rows = list(
                    session.scalars(
                        sa.select(Generation).where(Generation.id.in_(ids)).order_by(Generation.id)
                    )
                )
                session.expunge_all()
            done = sum(1 for r in rows if r.status in TERMINAL)
            if not quiet:
                _progress(done, len(ids), time.monotonic() - started, out, last)
            if done == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not quiet and out.isatty():
            out.write("\n")

        with session_scope(engine) as session:
            violations = ledger.verify(session)
            balance = ledger.balance(session, user)
            released = session.scalar(
                sa.text(
                    "SELECT count(*) FROM holds h JOIN accounts a ON a.id = h.account_id "
                    "WHERE a.user_id = :u AND h.status = 'released'"
                ),
                {"u": user},
            )

        s3 = stack.s3_client()
        s3_objects = 0
        checksum_errors = 0
        for row in rows:
            for obj in row.outputs or []:
                body = s3.get_object(Bucket=DEFAULT_BUCKET, Key=obj["key"])["Body"].read()
                s3_objects += 1
                if hashlib.sha256(body).hexdigest() != obj["sha256"] or len(body) != obj["size"]:
                    checksum_errors += 1

    charged = sum(r.amount_charged or 0 for r in rows)
    problems: list[str] = []
    for row in rows:
        if row.status != ids[row.id]:
            problems.append(
                f"generation {row.id} ended {row.status} ({row.error_code}), expected {ids[row.id]}"
            )
        if row.status == GenerationStatus.SUCCEEDED and not row.outputs:
            problems.append(f"generation {row.id} succeeded without outputs")
    if violations:
        problems.extend(str(v) for v in violations)
    if balance.balance != DEMO_CREDITS - charged:
        problems.append(f"balance {balance.balance} != {DEMO_CREDITS} - charged {charged}")
    if balance.held != 0:
        problems.append(f"{balance.held} credits still held")
    if checksum_errors:
        problems.append(f"{checksum_errors} S3 objects with a wrong checksum")

    result = DemoResult(
        submitted=len(ids),
        succeeded=sum(r.status == GenerationStatus.SUCCEEDED for r in rows),
        failed=sum(r.status in UNSUCCESSFUL for r in rows),
        refunded=int(released or 0),
        credits_before=DEMO_CREDITS,
        credits_after=balance.balance,
        credits_charged=charged,
        ledger_violations=len(violations),
        s3_objects=s3_objects,
        s3_checksum_errors=checksum_errors,
        unexpected=problems,
        wall_s=time.monotonic() - started,
    )
    if not quiet:
        _print_summary(rows, result, out)
    return result


def _print_summary(rows: list[Generation], result: DemoResult, out: Any) -> None:
    out.write("\n  id  model               status     charged  error / outputs\n")
    for row in rows:
        detail = row.error_code or ", ".join(o["key"] for o in row.outputs or [])
        out.write(
            f"  {row.id:<3} {row.model:<19} {row.status:<10} {row.amount_charged or 0:>7}  "
            f"{detail}\n"
        )
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
