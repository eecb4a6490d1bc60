"""Bad input of every kind, in one table: each case says how it must end, and the test proves it.

A request reaches the project three ways: the Python API (``generations.submit``,
``ledger.grant``), the command line (``ai-handler submit`` / ``credits grant``), and a row an
application writes straight into the tables, which is what the request sensor really reads. The
outcomes a case may expect:

- ``Refused``: the API raises / the CLI exits 2 with a message naming the problem, and nothing is
  written; the same session (or the next command) then accepts a good request.
- ``Deduplicated``: a repeated request id returns the first generation; nothing new is written.
- ``DatabaseRefuses``: a row an application writes is refused by the database itself (a CHECK,
  a unique index, a column type); nothing is written and the next good row goes in.
- ``Fails``: the generation ends ``failed`` with a stable error code and a message naming the
  cause; the user is not charged (balance unchanged; a hold is either never taken, or taken and
  released exactly once); nothing is left in S3 under ``generations/<id>/``; and the good row
  inserted right after it, in the same batch of the same run, succeeds with its output in S3.
- ``Succeeds``: the output is good and the nonsense the provider sent along only decides the
  charge (as if nothing had been reported); the neighbour succeeds too.

Every ``Fails`` row goes through the real path: the request sensor claims all of them (and their
good neighbours) in one batch, and the generation job runs that batch in process against the
Replicate emulator and S3 (moto) over HTTP, once on SQLite and once on PostgreSQL. Bad outputs come
from the emulator's test model ``test/bad-output``, priced only in this module's price table.
Production's download rules (HTTPS only) get their own run, whose neighbour is a text model.

Regressions reproduced here:

- a row written with a malformed user id (a newline, an empty string) raised inside
  ``reserve_credits``: the op failed after its retries, the run failed, and the bad row's
  neighbours were refunded or left ``queued``;
- a row whose input is a JSON list, a string or ``null`` raised inside ``create_predictions``
  (``dict(input)``) and failed the whole batch with ``run_failed``;
- a row whose input holds a control character reached the provider, and one with a lone
  surrogate failed only after a hold, as ``internal_error``;
- on SQLite, a row whose input is not JSON text at all made every request-sensor tick raise, so
  no request of anyone was ever claimed again;
- ``ai-handler submit --input @FILE`` with a file that is not UTF-8 crashed with a traceback
  (exit 1) instead of ``error: ...`` (exit 2);
- a prediction reported with a negative ``predict_time`` made ``finalize`` raise for a metered
  model: the op failed, and every generation of the batch not yet settled was refunded as
  ``run_failed`` although its output was stored and its prediction paid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import (
    DagsterInstance,
    ExecuteInProcessResult,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
)
from dagster_aws.s3 import S3PickleIOManager, S3Resource
from pydantic import Field
from sqlalchemy.orm import defer

from ai_handler_dagster import cli, ledger
from ai_handler_dagster import generations as gens
from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Account, Generation, Hold, LedgerEntry
from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration.generation import generation_job
from ai_handler_dagster.orchestration.request_sensor import generation_request_sensor
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.download import DownloadPolicy
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from tests.support.db import drop_pg_database, new_pg_database

GRANT = 10_000
#: The cap on one output file in the matrix runs (the oversized output is twice this).
MAX_OUTPUT_BYTES = 1024 * 1024
#: Credits of ``test/costly``: far more than anyone here has, within the ledger's limits.
HUGE_PRICE = 10**12

#: The shipped prices plus test models: ``test/bad-output`` (outputs that misbehave),
#: ``test/ghost-model`` (priced here, unknown to the provider) and ``test/costly``.
PRICES = f"""
[models."demo/pixel-sketch"]
credits = 5

[models."demo/haiku-text"]
credits_per_second = 2
max_seconds = 30

[models."test/bad-output"]
credits_per_second = 1
max_seconds = 10

[models."test/ghost-model"]
credits = 2

[models."test/costly"]
credits = {HUGE_PRICE}
"""

SKETCH, HAIKU, BAD_OUTPUT = "demo/pixel-sketch", "demo/haiku-text", "test/bad-output"
#: A request that already exists when the cases run (for the duplicate request id cases).
ORIGINAL = {"request_id": "req-original", "input": {"prompt": "the original request"}}


# --- what a case expects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """Refused at the door with ``message`` (any of them, when a tuple); nothing written."""

    message: str


@dataclass(frozen=True)
class Deduplicated:
    """A repeat of an existing request: the first generation is returned, nothing written."""


@dataclass(frozen=True)
class DatabaseRefuses:
    """The database refuses the write (constraint or type named by ``message``)."""

    message: str


@dataclass(frozen=True)
class Fails:
    """The generation fails with ``code``; ``held``: a hold was taken (and released once)."""

    code: str
    message: str | tuple[str, ...]
    held: bool


@dataclass(frozen=True)
class Succeeds:
    """The generation succeeds and is charged ``charged`` credits."""

    charged: int


Outcome = Refused | Deduplicated | DatabaseRefuses | Fails | Succeeds


@dataclass(frozen=True)
class Case:
    """One bad request: how it arrives (``via``), what it is, and how it must end.

    ``via``: ``api`` (``generations.submit`` / ``ledger.grant``), ``cli`` (``cli.main``),
    ``row`` (an INSERT into ``generations`` by an application) or ``sql`` (any other INSERT).
    """

    name: str
    via: str
    expect: Outcome
    user: str | None = None  # default: a funded user of its own, "user-<name>"
    funded: bool = True
    model: str = SKETCH
    input: Any = field(default_factory=lambda: prompt("a fox in the snow"))
    input_text: str | None = None  # a row's input column as raw text (not JSON-encoded)
    request_id: str | None = None
    amount: Any = None  # ledger.grant / credits grant
    priority: Any = None  # generations.submit's priority
    argv: tuple[str, ...] = ()  # cli: after "ai-handler"; {user} and {file} are filled in
    file: bytes | None = None  # cli: written to {file}
    sql: str = ""  # sql: a statement with :user and :key parameters
    columns: dict[str, Any] = field(default_factory=dict)  # row: other columns
    dialect: str | None = None  # only on this database ("sqlite" or "postgresql")
    production: bool = False  # run under production's download rules

    @property
    def owner(self) -> str:
        return self.user if self.user is not None else f"user-{self.name}"


def prompt(text: str) -> dict[str, Any]:
    return {"prompt": text}


def misbehave(how: str) -> dict[str, Any]:
    return {"prompt": f"bad output: {how}", "misbehave": how}


CASES: list[Case] = [
    # --- refused at the door: the Python API ---------------------------------------------------
    Case("api-unknown-user", "api", Refused("unknown user 'user-api-unknown-user'"), funded=False),
    Case(
        "api-user-id-with-newline",
        "api",
        Refused("user_id contains control character U+000A at position 3"),
        user="bad\nuser",
        funded=False,
    ),
    Case("api-unknown-model", "api", Refused("has no price"), model="nobody/no-such-model"),
    Case("api-malformed-model", "api", Refused("is not 'owner/name'"), model="pixel sketch"),
    Case(
        "api-deployment-with-version",
        "api",
        Refused("a deployment has no ':version'"),
        model="deployment:acme/sketcher:v1",
    ),
    Case("api-input-list", "api", Refused("input must be a JSON object, got list"), input=["a"]),
    Case("api-input-string", "api", Refused("input must be a JSON object, got str"), input="fox"),
    Case(
        "api-oversized-prompt",
        "api",
        Refused("bytes as JSON; the limit is 65536"),
        input=prompt("x" * 70_000),
    ),
    Case(
        "api-control-character",
        "api",
        Refused("input['prompt'] contains control character U+0000 at position 1"),
        input=prompt("a\x00b"),
    ),
    Case(
        "api-lone-surrogate",
        "api",
        Refused("input['prompt'] is not valid UTF-8 (lone surrogate"),
        input=prompt("caf\udce9"),
    ),
    Case(
        "api-not-a-number",
        "api",
        Refused("input['seed'] is nan, which JSON cannot represent"),
        input={"prompt": "x", "seed": float("nan")},
    ),
    Case(
        "api-cannot-afford-a-huge-price",
        "api",
        Refused(f"{GRANT} available, {HUGE_PRICE} needed"),
        model="test/costly",
    ),
    Case(
        "api-duplicate-request-id-other-input",
        "api",
        Refused("request_id 'req-original' was already used"),
        user="original",
        request_id="req-original",
        input=prompt("not the original"),
    ),
    Case(
        "api-duplicate-request-id-same-request",
        "api",
        Deduplicated(),
        user="original",
        request_id="req-original",
        input=ORIGINAL["input"],
    ),
    Case(
        "api-priority-above-ceiling",
        "api",
        Refused("priority 1 is above the highest 'user-api-priority-above-ceiling' may ask for (0"),
        priority=1,
    ),
    Case("api-priority-out-of-range", "api", Refused("from 0 to 9, got 10"), priority=10),
    Case("api-priority-text", "api", Refused("a whole number from 0 to 9, got '5'"), priority="5"),
    Case("api-grant-negative", "api", Refused("amount must be between 1 and"), amount=-5),
    Case("api-grant-fractional", "api", Refused("amount must be a whole number"), amount=2.5),
    Case("api-grant-huge", "api", Refused("amount must be between 1 and"), amount=10**16),
    # --- refused at the door: the command line -------------------------------------------------
    Case(
        "cli-input-not-json",
        "cli",
        Refused("--input is not valid JSON"),
        argv=("submit", "--user", "{user}", "--model", SKETCH, "--input", '{"prompt": fox'),
    ),
    Case(
        "cli-input-array",
        "cli",
        Refused("input must be a JSON object, got list"),
        argv=("submit", "--user", "{user}", "--model", SKETCH, "--input", '["a fox"]'),
    ),
    Case(
        "cli-non-utf8-argument",
        "cli",
        Refused("input['prompt'] is not valid UTF-8"),
        # What Python makes of bytes that are not UTF-8 on the command line.
        argv=(
            "submit",
            "--user",
            "{user}",
            "--model",
            SKETCH,
            "--input",
            os.fsdecode(b'{"prompt": "caf\xe9"}'),
        ),
    ),
    Case(
        "cli-non-utf8-file",
        "cli",
        Refused("is not valid UTF-8 (byte 0xe9 at offset 15)"),
        argv=("submit", "--user", "{user}", "--model", SKETCH, "--input", "@{file}"),
        file=b'{"prompt": "caf\xe9"}',
    ),
    Case(
        "cli-unknown-user",
        "cli",
        Refused("unknown user 'user-cli-unknown-user'"),
        funded=False,
        argv=("submit", "--user", "{user}", "--model", SKETCH, "--input", '{"prompt": "x"}'),
    ),
    Case(
        "cli-duplicate-request-id",
        "cli",
        Refused("request_id 'req-original' was already used"),
        user="original",
        argv=(
            "submit",
            "--user",
            "{user}",
            "--model",
            SKETCH,
            "--input",
            '{"prompt": "another"}',
            "--request-id",
            "req-original",
        ),
    ),
    Case(
        "cli-grant-negative",
        "cli",
        Refused("AMOUNT must be a whole number of credits, got '-5'"),
        argv=("credits", "grant", "{user}", "-5"),
    ),
    Case(
        "cli-grant-fractional",
        "cli",
        Refused("AMOUNT must be a whole number of credits, got '2.5'"),
        argv=("credits", "grant", "{user}", "2.5"),
    ),
    Case(
        "cli-grant-huge",
        "cli",
        Refused("amount must be between 1 and 1000000000000000 credits"),
        argv=("credits", "grant", "{user}", "1" + "0" * 16),
    ),
    Case(
        "cli-priority-above-ceiling",
        "cli",
        Refused("priority 2 is above the highest 'user-cli-priority-above-ceiling' may ask for"),
        argv=("submit", "--user", "{user}", "--model", SKETCH, "--input", "{}", "--priority", "2"),
    ),
    Case(
        "cli-priority-not-a-number",
        "cli",
        Refused("--priority must be a whole number, got 'high'"),
        argv=(
            "submit",
            "--user",
            "{user}",
            "--model",
            SKETCH,
            "--input",
            "{}",
            "--priority",
            "high",
        ),
    ),
    # --- written by an application, refused by the database ------------------------------------
    Case(
        "row-impossible-status",
        "row",
        DatabaseRefuses("status_valid"),
        columns={"status": "exploded"},
    ),
    Case("row-attempt-zero", "row", DatabaseRefuses("attempt_positive"), columns={"attempt": 0}),
    Case("row-priority-ten", "row", DatabaseRefuses("priority_range"), columns={"priority": 10}),
    Case(
        "row-negative-amount-held",
        "row",
        DatabaseRefuses("amount_held_nonnegative"),
        columns={"amount_held": -5},
    ),
    Case(
        "row-duplicate-request-id",
        "row",
        DatabaseRefuses("request_id"),
        columns={"request_id": "req-original"},
    ),
    Case(
        "row-input-not-json-postgres",
        "row",
        DatabaseRefuses("invalid input syntax for type json"),
        input_text="{prompt: not json",
        dialect="postgresql",
    ),
    Case(
        "row-user-id-too-long-postgres",
        "row",
        DatabaseRefuses("value too long"),
        user="u" * 300,
        funded=False,
        dialect="postgresql",
    ),
    Case(
        "sql-account-negative-available",
        "sql",
        DatabaseRefuses("available_nonnegative"),
        sql="INSERT INTO accounts (user_id, balance, held) VALUES (:user, 5, 10)",
        funded=False,
    ),
    Case(
        "sql-ledger-entry-negative-credits",
        "sql",
        DatabaseRefuses("amount_nonnegative"),
        sql=(
            "INSERT INTO ledger_entries "
            "(account_id, kind, amount, balance_delta, held_delta, idempotency_key) "
            "SELECT id, 'grant', -500, -500, 0, :key FROM accounts WHERE user_id = :user"
        ),
    ),
    # --- written by an application, failed when its run starts (nothing held) -------------------
    # (A row above its user's priority ceiling fails so too, in tests/test_priorities.py: here
    # it would be claimed in a batch of its own priority, apart from its neighbours.)
    Case(
        "row-unknown-user",
        "row",
        Fails("insufficient_credits", "unknown user 'user-row-unknown-user'", held=False),
        funded=False,
    ),
    Case(
        "row-user-id-with-newline",
        "row",
        Fails("invalid_request", "user_id contains control character U+000A", held=False),
        user="row\nuser",
        funded=False,
    ),
    Case(
        "row-empty-user-id",
        "row",
        Fails("invalid_request", "user_id must be a non-empty string", held=False),
        user="",
        funded=False,
    ),
    Case(
        "row-unpriced-model",
        "row",
        Fails("unpriced_model", "'nobody/no-such-model' has no price", held=False),
        model="nobody/no-such-model",
    ),
    Case(
        "row-malformed-model",
        "row",
        Fails("invalid_request", "is not 'owner/name'", held=False),
        model="pixel sketch",
    ),
    Case(
        "row-deployment-with-version",
        "row",
        Fails("invalid_request", "a deployment has no ':version'", held=False),
        model="deployment:acme/sketcher:v1",
    ),
    Case(
        "row-unpriced-deployment",
        "row",
        Fails("unpriced_model", "'deployment:acme/sketcher' has no price", held=False),
        model="deployment:acme/sketcher",
    ),
    Case(
        "row-input-list",
        "row",
        Fails("invalid_request", "input must be a JSON object, got list", held=False),
        input=["a", "fox"],
    ),
    Case(
        "row-input-string",
        "row",
        Fails("invalid_request", "input must be a JSON object, got str", held=False),
        input="a fox",
    ),
    Case(
        "row-input-null",
        "row",
        Fails("invalid_request", "input must be a JSON object, got NoneType", held=False),
        input=None,
    ),
    Case(
        "row-input-number",
        "row",
        Fails("invalid_request", "input must be a JSON object, got int", held=False),
        input=42,
    ),
    Case(
        "row-control-character",
        "row",
        Fails("invalid_request", "contains control character U+0000", held=False),
        input=prompt("a\x00b"),
    ),
    Case(
        "row-lone-surrogate",
        "row",
        Fails("invalid_request", "is not valid UTF-8 (lone surrogate", held=False),
        input=prompt("caf\udce9"),
    ),
    Case(
        "row-oversized-input",
        "row",
        Fails("invalid_request", "the limit is 65536", held=False),
        input=prompt("x" * 70_000),
    ),
    Case(
        "row-huge-price",
        "row",
        Fails("insufficient_credits", f"{GRANT} available, {HUGE_PRICE} needed", held=False),
        model="test/costly",
    ),
    Case(
        "row-input-not-json-sqlite",
        "row",
        Fails("invalid_request", "input is not valid JSON", held=False),
        input_text="{prompt: not json",
        dialect="sqlite",
    ),
    Case(
        # Regression: decoding it raised RecursionError in reserve_credits, which only caught
        # ValueError, so the op failed and the failure hook refunded every neighbour run_failed.
        "row-input-nested-5000-deep",
        "row",
        Fails("invalid_request", "input is nested too deeply to decode", held=False),
        input_text='{"a": ' + "[" * 5000 + "]" * 5000 + "}",
    ),
    Case(
        "row-user-id-too-long-sqlite",
        "row",
        Fails("invalid_request", "user_id is longer than 255 characters", held=False),
        user="u" * 300,
        funded=False,
        dialect="sqlite",
    ),
    # --- accepted, refused by the provider (hold taken, released once) -------------------------
    Case(
        "provider-missing-prompt",
        "api",
        Fails("invalid_input", "input: prompt is required", held=True),
        input={"seed": 1},
    ),
    Case(
        "provider-wrong-type",
        "row",
        Fails("invalid_input", "input.prompt: Invalid type. Expected: string", held=True),
        input={"prompt": 42},
    ),
    Case(
        "provider-out-of-range",
        "api",
        Fails("invalid_input", "input.width: Must be less than or equal to 1024", held=True),
        input={"prompt": "x", "width": 5000},
    ),
    Case(
        "provider-prompt-too-long",
        "row",
        Fails("invalid_input", "String length must be less than or equal to 2000", held=True),
        input=prompt("x" * 3000),
    ),
    Case(
        "provider-unknown-model",
        "api",
        Fails("model_not_found", "test/ghost-model", held=True),
        model="test/ghost-model",
        input=prompt("anything"),
    ),
    # --- accepted, the output is refused (hold taken, released once; nothing in S3) -------------
    Case(
        "output-foreign-host",
        "api",
        Fails("output_rejected", "outputs.attacker.example:443 is not on the allow-list", True),
        model=BAD_OUTPUT,
        input=misbehave("foreign-host"),
    ),
    Case(
        "output-private-address",
        "row",
        Fails("output_rejected", "resolves to a private address (10.0.0.7)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("private-address"),
    ),
    Case(
        "output-metadata-address",
        "api",
        Fails("output_rejected", "a link-local address (169.254.169.254)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("metadata-address"),
    ),
    Case(
        "output-redirect-to-metadata",
        "row",
        Fails("output_rejected", "a link-local address (169.254.169.254)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("redirect-to-metadata"),
    ),
    Case(
        "output-redirect-to-private",
        "api",
        Fails("output_rejected", "resolves to a private address (10.0.0.7)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("redirect-to-private"),
    ),
    Case(
        "output-oversized",
        "row",
        Fails("output_rejected", f"over the {MAX_OUTPUT_BYTES}-byte cap", held=True),
        model=BAD_OUTPUT,
        input={**misbehave("oversized"), "size_bytes": 2 * MAX_OUTPUT_BYTES},
    ),
    Case(
        "output-wrong-content-type",
        "api",
        Fails("output_rejected", "served as 'image/jpeg' but its bytes are image/png", True),
        model=BAD_OUTPUT,
        input=misbehave("wrong-content-type"),
    ),
    Case(
        "output-markup-as-image",
        "row",
        Fails("output_rejected", "output bytes are markup (HTML/XML/SVG)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("markup-as-image"),
    ),
    Case(
        "output-expired",
        "api",
        Fails("output_expired", ("already removed its output", "gone (HTTP 404)"), held=True),
        model=BAD_OUTPUT,
        input=misbehave("expired"),
    ),
    Case(
        "output-gone",
        "row",
        Fails("output_expired", "output is gone (HTTP 404)", held=True),
        model=BAD_OUTPUT,
        input=misbehave("gone"),
    ),
    Case(
        "output-negative-predict-time",
        "api",
        Succeeds(charged=10),  # test/bad-output's hold: 1 credit/s for at most 10 s
        model=BAD_OUTPUT,
        input=misbehave("negative-predict-time"),
    ),
    # Regression: a succeeded prediction with nothing to store was charged the full price with
    # zero outputs. Now it fails (empty_output) and is refunded.
    *(
        Case(
            f"output-{how}",
            via,
            Fails("empty_output", "the prediction succeeded with no output to store", True),
            model=BAD_OUTPUT,
            input=misbehave(how),
        )
        for how, via in (
            ("empty-null", "api"),
            ("empty-string", "row"),
            ("empty-list", "api"),
            ("empty-chunk", "row"),
        )
    ),
    Case(
        "output-plain-http-in-production",
        "api",
        Fails("output_rejected", "output URL must use HTTPS", held=True),
        input=prompt("a good picture, served over plain HTTP"),
        production=True,
    ),
]

assert len({case.name for case in CASES}) == len(CASES)


# --- the world every case is checked in -------------------------------------------------------


class ListedHostsPolicy(OutputPolicyResource):
    """The embedded download rules, with an allow-list that also lists a private and the
    metadata address (as a careless operator might): the address checks must still refuse them.
    """

    also_allowed: list[str] = Field(
        default_factory=list, description="Hosts added to the allow-list."
    )

    def policy(self) -> DownloadPolicy:
        base = super().policy()
        return dataclasses.replace(base, allowed_hosts=(*base.allowed_hosts, *self.also_allowed))


@dataclass
class World:
    """One database with every case's rows, after the sensor and the runs went through them."""

    url: str
    dialect: str
    prefix: str
    s3: LocalS3
    pricing_file: Path
    ids: dict[str, int]
    neighbours: dict[str, int]
    runs: list[ExecuteInProcessResult]
    original_id: int
    after_tick: SensorResult | SkipReason

    @property
    def engine(self) -> sa.Engine:
        return make_engine(self.url)

    def keys(self, generation_id: int) -> list[str]:
        found = self.s3.client().list_objects_v2(
            Bucket=self.s3.bucket, Prefix=f"{self.prefix}/generations/{generation_id}/"
        )
        return sorted(item["Key"] for item in found.get("Contents", []))


def _create_attempts(engine: sa.Engine, generation_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM create_attempts WHERE generation_id = :g"),
                {"g": generation_id},
            ).scalar_one()
        )


def _runs_here(case: Case, dialect: str) -> bool:
    return case.dialect is None or case.dialect == dialect


def _insert_row(
    engine: sa.Engine,
    *,
    user: str,
    model: str,
    payload: Any = None,
    payload_text: str | None = None,
    **columns: Any,
) -> int:
    """INSERT a generation with plain SQL, as an application would (no project code)."""
    values = {
        "user_id": user,
        "model": model,
        "input": payload_text if payload_text is not None else json.dumps(payload),
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(f":{name}" for name in values)
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.text(f"INSERT INTO generations ({names}) VALUES ({params}) RETURNING id"),
                values,
            ).scalar_one()
        )


def _resources(
    url: str,
    emulator: EmulatorHandle,
    s3: LocalS3,
    *,
    pricing_file: Path,
    prefix: str,
    output_policy: OutputPolicyResource,
) -> dict[str, Any]:
    s3_resource = S3Resource(endpoint_url=s3.endpoint_url, region_name="us-east-1")
    return {
        "database": DatabaseResource(url=url),
        "pricing": PricingResource(pricing_file=str(pricing_file)),
        "replicate": ReplicateResource(
            api_token=emulator.token, base_url=emulator.base_url, poll_initial_s=0.1
        ),
        "output_policy": output_policy,
        "s3": s3_resource,
        "outputs_io_manager": GenerationOutputsIOManager(
            s3=s3_resource, bucket=s3.bucket, prefix=prefix
        ),
        "io_manager": S3PickleIOManager(
            s3_resource=s3_resource, s3_bucket=s3.bucket, s3_prefix=f"{prefix}/dagster-io"
        ),
    }


def _tick(url: str, instance: DagsterInstance) -> SensorResult | SkipReason:
    context = build_sensor_context(
        instance=instance, resources={"database": DatabaseResource(url=url)}
    )
    result = generation_request_sensor(context)
    assert isinstance(result, SensorResult | SkipReason)
    return result


def _run_pending(
    url: str, instance: DagsterInstance, resources: dict[str, Any], expected: int
) -> ExecuteInProcessResult:
    """One sensor tick claims every pending row as one batch; the job runs that batch."""
    tick = _tick(url, instance)
    assert isinstance(tick, SensorResult), tick
    (request,) = tick.run_requests or []
    claimed = request.run_config["ops"]["reserve_credits"]["config"]["generation_ids"]
    assert len(claimed) == expected
    return generation_job.execute_in_process(
        run_config=request.run_config,
        tags=request.tags,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )


def _create_request(world_engine: sa.Engine, case: Case, prices: Any) -> int:
    """Put one ``Fails`` case's request in, the way the case says it arrives."""
    if case.via == "row":
        return _insert_row(
            world_engine,
            user=case.owner,
            model=case.model,
            payload=case.input,
            payload_text=case.input_text,
            **case.columns,
        )
    assert case.via == "api", case
    with session_scope(world_engine) as session:
        return gens.submit(
            session, user_id=case.owner, model=case.model, input=case.input, prices=prices
        ).id


@contextlib.contextmanager
def _database(dialect: str, tmp: Path) -> Iterator[str]:
    if dialect == "sqlite":
        yield f"sqlite:///{tmp / 'app.db'}"
        return
    url = new_pg_database("aih_matrix")
    try:
        yield url
    finally:
        make_engine(url).dispose()
        drop_pg_database(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_available: bool,
    local_s3: LocalS3,
) -> Iterator[World]:
    dialect: str = request.param
    if dialect == "postgresql" and not pg_available:
        pytest.skip("PostgreSQL is not reachable (set AI_HANDLER_TEST_PG_URL)")
    tmp = tmp_path_factory.mktemp(f"matrix-{dialect}")
    pricing_file = tmp / "prices.toml"
    pricing_file.write_text(PRICES)
    prices = load_pricing(pricing_file)
    prefix = f"matrix-{uuid.uuid4().hex[:10]}"
    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Every row of a run in one batch, whoever it belongs to.
            "AI_HANDLER_MAX_BATCH": "500",
            "AI_HANDLER_MAX_IN_FLIGHT": "1000",
            "AI_HANDLER_MAX_IN_FLIGHT_PER_USER": "1000",
            "AI_HANDLER_SMALL_BACKLOG": "1",
        }.items():
            mp.setenv(name, value)
        mp.delenv("AI_HANDLER_WEBHOOK_URL", raising=False)
        url = stack.enter_context(_database(dialect, tmp))
        upgrade(url)
        engine = make_engine(url)
        emulator = stack.enter_context(
            start_emulator(EmulatorConfig(latency_s=0.1, concurrency=16), port=0)
        )
        s3 = local_s3  # the session's endpoint; this world's keys are under its prefix
        instance = stack.enter_context(instance_for_test())

        with session_scope(engine) as session:
            users = {case.owner for case in CASES if case.funded} | {"neighbour", "original"}
            for user in sorted(users):
                ledger.grant(session, user, GRANT, key=f"matrix:{user}")
            original_id = gens.submit(
                session,
                user_id="original",
                model=SKETCH,
                input=ORIGINAL["input"],
                request_id=ORIGINAL["request_id"],
                prices=prices,
            ).id

        def fill(production: bool) -> tuple[dict[str, int], dict[str, int]]:
            ids: dict[str, int] = {}
            neighbours: dict[str, int] = {}
            for case in CASES:
                if not isinstance(case.expect, Fails | Succeeds) or not _runs_here(case, dialect):
                    continue
                if case.production != production:
                    continue
                ids[case.name] = _create_request(engine, case, prices)
                # The good row right behind it: production's rules only take text outputs.
                neighbours[case.name] = _insert_row(
                    engine,
                    user="neighbour",
                    model=HAIKU if production else SKETCH,
                    payload=prompt(f"the neighbour of {case.name}"),
                )
            return ids, neighbours

        runs: list[ExecuteInProcessResult] = []
        ids, neighbours = fill(production=False)
        embedded_rules = ListedHostsPolicy(
            emulator_base_url=emulator.base_url,
            max_bytes=MAX_OUTPUT_BYTES,
            also_allowed=["10.0.0.7", "169.254.169.254"],
        )
        resources = _resources(
            url,
            emulator,
            s3,
            pricing_file=pricing_file,
            prefix=prefix,
            output_policy=embedded_rules,
        )
        runs.append(_run_pending(url, instance, resources, expected=2 * len(ids) + 1))

        more_ids, more_neighbours = fill(production=True)
        resources["output_policy"] = OutputPolicyResource(max_bytes=MAX_OUTPUT_BYTES)
        runs.append(_run_pending(url, instance, resources, expected=2 * len(more_ids)))
        ids.update(more_ids)
        neighbours.update(more_neighbours)

        yield World(
            url=url,
            dialect=dialect,
            prefix=prefix,
            s3=s3,
            pricing_file=pricing_file,
            ids=ids,
            neighbours=neighbours,
            runs=runs,
            original_id=original_id,
            after_tick=_tick(url, instance),
        )


# --- checks -----------------------------------------------------------------------------------


def _counts_in(session: Any) -> dict[str, int]:
    """Rows per table, as ``session`` sees them."""
    return {
        model.__tablename__: int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)
        for model in (Generation, Account, Hold, LedgerEntry)
    }


def _counts(engine: sa.Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return _counts_in(session)


def _balance(engine: sa.Engine, user: str) -> tuple[int, int] | None:
    with session_scope(engine) as session:
        try:
            found = ledger.balance(session, user)
        except (ledger.UnknownAccount, ValueError):  # no account, or an id none could have
            return None
        return found.balance, found.held


def _message_matches(message: str, expected: str | tuple[str, ...]) -> bool:
    options = expected if isinstance(expected, tuple) else (expected,)
    return any(option in message for option in options)


def _check_refused_api(world: World, case: Case) -> None:
    prices = load_pricing(world.pricing_file)
    before = _counts(world.engine)
    with session_scope(world.engine) as session:
        if case.amount is not None:
            with pytest.raises(ledger.LedgerError) as refused:
                ledger.grant(session, case.owner, case.amount, key=f"bad:{case.name}")
            assert _counts_in(session) == before  # nothing flushed by the refused call
            # The same transaction goes on: a good grant right after it is accepted.
            ledger.grant(session, case.owner, 1, key=f"good:{case.name}")
        else:
            with pytest.raises(gens.InvalidRequest) as refused:
                gens.submit(
                    session,
                    user_id=case.owner,
                    model=case.model,
                    input=case.input,
                    request_id=case.request_id,
                    prices=prices,
                    priority=case.priority,
                )
            assert _counts_in(session) == before
            good = gens.submit(
                session,
                user_id="neighbour",
                model=SKETCH,
                input=prompt(f"accepted right after {case.name}"),
                prices=prices,
            )
            assert good.status == "pending"
    assert isinstance(case.expect, Refused)
    assert case.expect.message in str(refused.value)


def _check_refused_cli(
    world: World, case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "input.json"
    if case.file is not None:
        file.write_bytes(case.file)
    argv = [part.replace("{user}", case.owner).replace("{file}", str(file)) for part in case.argv]
    before = _counts(world.engine)
    capsys.readouterr()
    code = cli.main([*argv, "--url", world.url])
    out, err = capsys.readouterr()
    assert isinstance(case.expect, Refused)
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and case.expect.message in err, err
    assert "Traceback" not in err
    assert _counts(world.engine) == before
    # The next good command goes through.
    good = cli.main(
        [
            "submit",
            "--user",
            "neighbour",
            "--model",
            SKETCH,
            "--input",
            json.dumps(prompt(f"accepted after {case.name}")),
            "--url",
            world.url,
        ]
    )
    assert good == 0, capsys.readouterr().err


def _check_deduplicated(world: World, case: Case) -> None:
    before = _counts(world.engine)
    with session_scope(world.engine) as session:
        again = gens.submit(
            session,
            user_id=case.owner,
            model=case.model,
            input=case.input,
            request_id=case.request_id,
            prices=load_pricing(world.pricing_file),
        )
        assert again.id == world.original_id
    assert _counts(world.engine) == before


def _check_database_refuses(world: World, case: Case) -> None:
    assert isinstance(case.expect, DatabaseRefuses)
    before = _counts(world.engine)
    with pytest.raises(sa.exc.DBAPIError) as refused:
        if case.via == "sql":
            with world.engine.begin() as conn:
                conn.execute(sa.text(case.sql), {"user": case.owner, "key": f"bad:{case.name}"})
        else:
            _insert_row(
                world.engine,
                user=case.owner,
                model=case.model,
                payload=case.input,
                payload_text=case.input_text,
                **case.columns,
            )
    assert isinstance(refused.value, sa.exc.IntegrityError | sa.exc.DataError)
    assert case.expect.message in str(refused.value.orig)
    assert _counts(world.engine) == before
    # The application's next good row goes in.
    _insert_row(world.engine, user="neighbour", model=SKETCH, payload=prompt(f"after {case.name}"))


def _check_fails(world: World, case: Case) -> None:
    assert isinstance(case.expect, Fails)
    gid, neighbour_id = world.ids[case.name], world.neighbours[case.name]
    with session_scope(world.engine) as session:
        # Not decoding inputs: one case's input is not JSON at all.
        rows = session.scalars(
            sa.select(Generation)
            .where(Generation.id.in_((gid, neighbour_id)))
            .options(defer(Generation.input))
        )
        by_id = {found.id: found for found in rows}
        row, neighbour = by_id[gid], by_id[neighbour_id]
        holds = list(session.scalars(sa.select(Hold).where(Hold.generation_id == gid)))
        entries = [
            list(
                session.scalars(
                    sa.select(LedgerEntry.kind)
                    .where(LedgerEntry.hold_id == hold.id)
                    .order_by(LedgerEntry.id)
                )
            )
            for hold in holds
        ]
        session.expunge_all()
    expect = case.expect
    assert (row.status, row.error_code) == ("failed", expect.code), row.error_message
    assert _message_matches(row.error_message or "", expect.message), row.error_message
    assert row.amount_charged == 0
    if expect.held:
        # One hold, and it ended once: released, never captured.
        assert [(h.status, h.captured_amount) for h in holds] == [("released", 0)]
        assert entries == [["hold", "release"]]
    else:
        assert (holds, row.hold_id, row.amount_held) == ([], None, 0)
        assert row.prediction_id is None
        assert _create_attempts(world.engine, gid) == 0  # never sent
    assert _balance(world.engine, case.owner) == ((GRANT, 0) if case.funded else None)
    assert world.keys(gid) == []
    # The good row right behind it, in the same batch of the same run, went through.
    assert neighbour.batch_key == row.batch_key
    assert neighbour.status == "succeeded", neighbour.error_message
    ext = "txt" if case.production else "png"
    assert world.keys(neighbour_id) == [f"{world.prefix}/generations/{neighbour_id}/a1/0.{ext}"]


def _check_succeeds(world: World, case: Case) -> None:
    assert isinstance(case.expect, Succeeds)
    gid, neighbour_id = world.ids[case.name], world.neighbours[case.name]
    with session_scope(world.engine) as session:
        row = session.get_one(Generation, gid)
        neighbour = session.get_one(Generation, neighbour_id)
        session.expunge_all()
    assert row.status == "succeeded", row.error_message
    assert row.amount_charged == case.expect.charged
    assert _balance(world.engine, case.owner) == (GRANT - case.expect.charged, 0)
    assert world.keys(gid) == [f"{world.prefix}/generations/{gid}/a1/0.png"]
    assert (neighbour.status, neighbour.batch_key) == ("succeeded", row.batch_key)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(
    world: World, case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not _runs_here(case, world.dialect):
        pytest.skip(f"a {case.dialect} case; the other database has its own twin")
    if isinstance(case.expect, Fails):
        _check_fails(world, case)
    elif isinstance(case.expect, Succeeds):
        _check_succeeds(world, case)
    elif isinstance(case.expect, Deduplicated):
        _check_deduplicated(world, case)
    elif isinstance(case.expect, DatabaseRefuses):
        _check_database_refuses(world, case)
    elif case.via == "cli":
        _check_refused_cli(world, case, tmp_path, capsys)
    else:
        _check_refused_api(world, case)


def test_the_batches_with_every_bad_row_ran_to_the_end(world: World) -> None:
    """No bad row crashed the sensor or a run: both runs succeeded, every good row in them
    succeeded, the next tick finds nothing left to claim, and the books balance."""
    assert [run.success for run in world.runs] == [True, True]
    with session_scope(world.engine) as session:
        good = list(session.scalars(sa.select(Generation).where(Generation.user_id == "neighbour")))
        statuses = {row.id: row.status for row in good if row.id in world.neighbours.values()}
        original = session.get_one(Generation, world.original_id).status
        assert ledger.verify(session) == []
        assert gens.verify(session) == []
    assert set(statuses.values()) == {"succeeded"}
    assert len(statuses) == len(world.neighbours)
    assert original == "succeeded"
    assert isinstance(world.after_tick, SkipReason)
    assert "No pending" in (world.after_tick.skip_message or "")


def test_the_matrix_covers_every_way_in() -> None:
    """The table has at least 30 cases, and every way in meets every kind of outcome it can."""
    assert len(CASES) >= 30
    kinds = {(case.via, type(case.expect).__name__) for case in CASES}
    assert {
        ("api", "Refused"),
        ("api", "Deduplicated"),
        ("api", "Fails"),
        ("api", "Succeeds"),
        ("cli", "Refused"),
        ("row", "DatabaseRefuses"),
        ("row", "Fails"),
        ("sql", "DatabaseRefuses"),
    } <= kinds
