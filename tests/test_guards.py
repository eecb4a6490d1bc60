"""Guards around the generation path: secrets stay secret, outputs stay private, users share.

Proves that:

- (secrets) through the real daemon path (a dagster-daemon, run workers, the emulator and the S3
  endpoint as processes, with distinctive fake values for the Replicate token and the S3 secret
  key), neither value appears in any Dagster event record (messages, metadata, errors), in run
  config or run tags, in the captured compute logs, in the stack's log files, or in any file of
  the state folder at all (Dagster's storage, the app database); and that a run whose token the
  provider refuses (``unauthorized``) echoes that token neither in the row nor in its events;
- (privacy) stored outputs carry no public ACL grant and no bucket policy opens them, an
  unsigned request is refused, and the link the IO manager hands out (its presigned URL in the
  output metadata) works, and is signed over an expiry of the configured lifetime (moto, the S3
  stand-in, checks neither presigned signatures nor expiry, so both are verified on the link);
- (fairness) under a per-user in-flight cap, a user with a big backlog and a user with a few
  requests progress together through real sensor ticks and job runs: the first runs carry both
  users, and the small user's requests are all done before the big backlog is.

The webhook route's refusals (bad signatures, replays, stale timestamps, oversized or
malformed bodies, a missing secret) are proven in ``tests/webhooks`` (``test_verify.py``,
``test_route.py``, ``test_store.py``, ``test_end_to_end.py``) and not repeated here.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from dagster import (
    DagsterInstance,
    EnvVar,
    SensorResult,
    SkipReason,
    UrlMetadataValue,
    build_sensor_context,
    instance_for_test,
    serialize_value,
)
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db import upgrade
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from ai_handler_dagster.devstack.emulator import EmulatorConfig, EmulatorHandle, start_emulator
from ai_handler_dagster.devstack.s3 import LocalS3
from ai_handler_dagster.orchestration.generation import generation_job
from ai_handler_dagster.orchestration.request_sensor import generation_request_sensor
from ai_handler_dagster.pricing import load_pricing
from ai_handler_dagster.resources.database import DatabaseResource, PricingResource
from ai_handler_dagster.resources.outputs import OutputPolicyResource
from ai_handler_dagster.resources.replicate import ReplicateResource
from ai_handler_dagster.storage.io_manager import GenerationOutputsIOManager
from tests.support.stack import App, dagster_instance, running_stack, stack_config, unique

#: Distinctive fake secrets: if one of these strings shows up anywhere, it leaked.
REPLICATE_TOKEN = "r8_GuardTok3nQx7Vd9LmWz4Kp1Ns8Hy2Bc"
S3_SECRET_KEY = "GuardS3cretKey4Fj8Lq2Xw7Zc4Vb9Nm1Pr6Ts"
S3_ACCESS_KEY_ID = "AKIAGUARDTESTKEY0001"
SECRETS = {"Replicate token": REPLICATE_TOKEN, "S3 secret key": S3_SECRET_KEY}

PRICES = """
[models."demo/pixel-sketch"]
credits = 5

[models."demo/haiku-text"]
credits_per_second = 2
max_seconds = 30

[models."test/bad-output"]
credits = 3
"""


def leaked(text: str | bytes) -> list[str]:
    """Which secrets occur in ``text``."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return [name for name, value in SECRETS.items() if value.encode() in data]


def event_texts(instance: DagsterInstance, run_id: str) -> list[str]:
    """Every event record of a run, serialized whole (message, metadata, error, stack trace)."""
    return [serialize_value(entry) for entry in instance.all_logs(run_id)]


# --- (a) secrets ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_secrets_never_reach_events_logs_config_or_storage(tmp_path: Path) -> None:
    """Regression guard: a secret in run config, a log line, an error message or metadata is
    stored for good in Dagster's storage and shown in the UI to everyone who can see runs."""
    state = tmp_path / "stack"
    pricing = tmp_path / "prices.toml"
    pricing.write_text(PRICES)
    config = stack_config(
        state,
        # The stack's API would fetch its signing secret with the emulator's default token.
        webhooks=False,
        extra_env={
            "EMULATOR_TOKEN": REPLICATE_TOKEN,  # what the emulator process accepts
            "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AI_HANDLER_PRICING_FILE": str(pricing),
        },
    )
    with running_stack(config) as stack:
        app = App(stack.app_db_url)
        try:
            user = unique("guard")
            app.grant(user, 1000)
            good = app.insert(user, "demo/pixel-sketch", {"prompt": f"a safe picture {user}"})
            ids = [
                good,
                app.insert(user, "demo/pixel-sketch", {"prompt": f"model failure [fail] {user}"}),
                app.insert(user, "demo/pixel-sketch", {"seed": 3}),  # the provider says 422
                app.insert(user, "test/bad-output", {"prompt": "x", "misbehave": "foreign-host"}),
                app.insert(user, "demo/haiku-text", ["not", "an", "object"]),  # not an object
            ]
            rows = app.wait_terminal(ids)
        finally:
            app.engine.dispose()
        assert [rows[i].status for i in ids] == ["succeeded", *["failed"] * 4]
        assert [rows[i].error_code for i in ids[1:]] == [
            "prediction_failed",
            "invalid_input",
            "output_rejected",
            "invalid_request",
        ]
        for row in rows.values():
            assert leaked(row.error_message or "") == []

        with dagster_instance(stack) as instance:
            runs = instance.get_runs()
            assert runs
            events: list[str] = []
            for run in runs:
                assert leaked(json.dumps(run.run_config, default=str)) == [], run.run_id
                assert leaked(json.dumps(run.tags)) == [], run.run_id
                events.extend(event_texts(instance, run.run_id))
    # The daemon and the run workers are gone: every file is final now.

    assert [name for text in events for name in leaked(text)] == []
    joined = "\n".join(events)
    # The scan sees what it must: output metadata (an S3 URI) and the ops' log messages.
    assert f"generations/{good}/a1/0.png" in joined
    assert "output_rejected" in joined and "invalid_input" in joined

    compute_logs = [
        path
        for path in (stack.dagster_home / "storage").rglob("*")
        if path.is_file() and path.suffix in (".out", ".err")
    ]
    assert compute_logs, "no captured compute logs to search"
    assert any(path.stat().st_size for path in compute_logs)
    stack_logs = sorted(stack.logs_dir.glob("*.log"))
    assert {path.stem for path in stack_logs} >= {"daemon", "emulator", "s3"}

    # Every file of the state folder: Dagster's storage (runs, event logs, ticks, compute
    # logs), the app database, the stack's logs and configuration.
    files = [path for path in state.rglob("*") if path.is_file()]
    assert any(path.name.endswith(".db") for path in files)
    assert any(f"a safe picture {user}".encode() in path.read_bytes() for path in files)
    found = {str(path.relative_to(state)): leaked(path.read_bytes()) for path in files}
    assert {path: names for path, names in found.items() if names} == {}


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    with start_emulator(EmulatorConfig(latency_s=0.1, concurrency=8), port=0) as handle:
        yield handle


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:
        yield inst


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AI_HANDLER_WEBHOOK_URL", raising=False)


def resources(
    db_url: str,
    emulator: EmulatorHandle,
    s3: LocalS3,
    *,
    prefix: str,
    presign_expires_s: int = 3600,
) -> dict[str, Any]:
    """The job's resources as production builds them: the token read from the environment."""
    s3_resource = S3Resource(endpoint_url=s3.endpoint_url, region_name="us-east-1")
    return {
        "database": DatabaseResource(url=db_url),
        "pricing": PricingResource(),
        "replicate": ReplicateResource(
            api_token=EnvVar("REPLICATE_API_TOKEN"), base_url=emulator.base_url, poll_initial_s=0.1
        ),
        "output_policy": OutputPolicyResource(emulator_base_url=emulator.base_url),
        "s3": s3_resource,
        "outputs_io_manager": GenerationOutputsIOManager(
            s3=s3_resource, bucket=s3.bucket, prefix=prefix, presign_expires_s=presign_expires_s
        ),
        "io_manager": S3PickleIOManager(
            s3_resource=s3_resource, s3_bucket=s3.bucket, s3_prefix=f"{prefix}/dagster-io"
        ),
    }


def submit(db_url: str, user: str, payloads: list[dict[str, Any]], grant: int = 1000) -> list[int]:
    upgrade(db_url)
    prices = load_pricing()
    with session_scope(make_engine(db_url)) as session:
        ledger.grant(session, user, grant, key=f"guard:{user}")
        return [
            gens.submit(
                session, user_id=user, model="demo/pixel-sketch", input=payload, prices=prices
            ).id
            for payload in payloads
        ]


def run_config(ids: list[int]) -> dict[str, Any]:
    return {"ops": {"reserve_credits": {"config": {"generation_ids": ids}}}}


def test_a_refused_token_is_not_echoed_anywhere(
    sqlite_url: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    instance: DagsterInstance,
    aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider refuses the token (401): the generation fails ``unauthorized`` and is
    refunded, and neither the token nor the S3 secret shows in the row or the run's events."""
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)  # the emulator wants another
    ids = submit(sqlite_url, "eve", [{"prompt": "refused"}])
    result = generation_job.execute_in_process(
        run_config=run_config(ids),
        resources=resources(sqlite_url, emulator, local_s3, prefix=uuid.uuid4().hex),
        instance=instance,
        tags={"ai_handler/user": "eve"},
    )
    assert result.success
    with session_scope(make_engine(sqlite_url)) as session:
        row = session.get_one(Generation, ids[0])
        assert (row.status, row.error_code) == ("failed", "unauthorized")
        assert leaked(row.error_message or "") == []
        assert ledger.balance(session, "eve").available == 1000
    run = instance.get_run_by_id(result.run_id)
    assert run is not None
    assert leaked(json.dumps(run.run_config) + json.dumps(run.tags)) == []
    texts = event_texts(instance, result.run_id)
    assert any("unauthorized" in text for text in texts)
    assert [name for text in texts for name in leaked(text)] == []


# --- (b) outputs are private; links expire ----------------------------------------------------


def presigned_links(instance: DagsterInstance, run_id: str) -> list[str]:
    """The URLs in the run's output metadata (the IO manager's ``first_object`` link)."""
    links = []
    for entry in instance.all_logs(run_id):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        for value in (getattr(data, "metadata", None) or {}).values():
            if isinstance(value, UrlMetadataValue):
                links.append(value.url)
    return links


def test_outputs_are_private_and_their_links_expire(
    sqlite_url: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    instance: DagsterInstance,
    aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", emulator.token)
    lifetime_s = 2
    prefix = f"guard-{uuid.uuid4().hex[:10]}"
    ids = submit(sqlite_url, "pat", [{"prompt": "private one"}, {"prompt": "private two"}])
    started = time.time()
    result = generation_job.execute_in_process(
        run_config=run_config(ids),
        resources=resources(
            sqlite_url, emulator, local_s3, prefix=prefix, presign_expires_s=lifetime_s
        ),
        instance=instance,
    )
    assert result.success
    client = local_s3.client()
    keys = sorted(
        item["Key"]
        for item in client.list_objects_v2(
            Bucket=local_s3.bucket, Prefix=f"{prefix}/generations/"
        ).get("Contents", [])
    )
    assert keys == [f"{prefix}/generations/{gid}/a1/0.png" for gid in sorted(ids)]

    # Private: the owner alone has a grant; nothing public, no bucket policy; anonymous refused.
    owner = client.get_bucket_acl(Bucket=local_s3.bucket)["Owner"]["ID"]
    for key in keys:
        grants = client.get_object_acl(Bucket=local_s3.bucket, Key=key)["Grants"]
        assert [(g["Grantee"].get("ID"), g["Permission"]) for g in grants] == [
            (owner, "FULL_CONTROL")
        ]
        assert httpx.get(f"{local_s3.endpoint_url}/{local_s3.bucket}/{key}").status_code == 403
    bucket_grants = client.get_bucket_acl(Bucket=local_s3.bucket)["Grants"]
    assert all(g["Grantee"].get("Type") == "CanonicalUser" for g in bucket_grants)
    with pytest.raises(client.exceptions.ClientError, match="NoSuchBucketPolicy"):
        client.get_bucket_policy(Bucket=local_s3.bucket)

    # The link handed out: signed, over an expiry of the configured lifetime.
    (link,) = presigned_links(instance, result.run_id)
    parts = urllib.parse.urlsplit(link)
    query = dict(urllib.parse.parse_qsl(parts.query))
    bucket, _, key = parts.path.lstrip("/").partition("/")
    assert (bucket, key) == (local_s3.bucket, keys[0])
    # Signature version 4 (version 2 links are refused by regions opened since 2014): the
    # lifetime and the signing time are part of what is signed.
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == str(lifetime_s)
    assert query.get("X-Amz-Signature")
    assert query["X-Amz-Credential"].startswith(S3_ACCESS_KEY_ID + "/")
    assert "x-amz-date" in query["X-Amz-SignedHeaders"] or query.get("X-Amz-Date")
    signed_at = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    expires_at = signed_at + lifetime_s
    assert started - 5 < signed_at <= time.time() + 1
    with session_scope(make_engine(sqlite_url)) as session:
        stored = session.get_one(Generation, sorted(ids)[0]).outputs or []
    fetched = httpx.get(link)
    assert fetched.status_code == 200
    assert hashlib.sha256(fetched.content).hexdigest() == stored[0]["sha256"]
    # Past its lifetime the link is dead by S3's rule (403 "Request has expired"). moto, the S3
    # stand-in here, checks neither presigned signatures nor expiry, so the rule is asserted on
    # the link itself rather than on moto's answer.
    time.sleep(max(0.0, expires_at - time.time()) + 0.5)
    assert time.time() > expires_at


# --- (c) fairness through real runs -----------------------------------------------------------


def test_a_big_backlog_and_a_small_one_finish_interleaved_through_real_runs(
    pg_url: str,
    emulator: EmulatorHandle,
    local_s3: LocalS3,
    instance: DagsterInstance,
    aws_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression guard: claiming strictly oldest-first let one user's backlog take every slot
    until it drained. Here the sensor's ticks and the job's runs alternate until all is done."""
    monkeypatch.setenv("REPLICATE_API_TOKEN", emulator.token)
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT", "4")
    monkeypatch.setenv("AI_HANDLER_MAX_IN_FLIGHT_PER_USER", "2")
    monkeypatch.setenv("AI_HANDLER_MAX_BATCH", "4")
    monkeypatch.setenv("AI_HANDLER_SMALL_BACKLOG", "0")
    heavy = submit(pg_url, "heavy", [{"prompt": f"heavy {i}", "seed": i} for i in range(6)])
    light = submit(pg_url, "light", [{"prompt": f"light {i}", "seed": i} for i in range(3)])
    job_resources = resources(pg_url, emulator, local_s3, prefix=uuid.uuid4().hex)
    context = build_sensor_context(
        instance=instance, resources={"database": DatabaseResource(url=pg_url)}
    )

    batches: list[list[int]] = []
    for _ in range(20):
        tick = generation_request_sensor(context)
        if isinstance(tick, SkipReason):
            break
        assert isinstance(tick, SensorResult)
        for request in tick.run_requests or []:
            ids = request.run_config["ops"]["reserve_credits"]["config"]["generation_ids"]
            batches.append(ids)
            run = generation_job.execute_in_process(
                run_config=request.run_config,
                tags=request.tags,
                resources=job_resources,
                instance=instance,
            )
            assert run.success
    with session_scope(make_engine(pg_url)) as session:
        rows = list(session.scalars(sa.select(Generation).order_by(Generation.finished_at)))
        assert ledger.verify(session) == []
    assert {row.status for row in rows} == {"succeeded"}
    assert len(rows) == 9

    # Three runs: both users share the first two; no run holds more than two of one user's.
    assert [len(batch) for batch in batches] == [4, 3, 2]
    for batch in batches:
        assert len(set(batch) & set(heavy)) <= 2 and len(set(batch) & set(light)) <= 2
    # The light user's three are done within the first two runs, each shared with the heavy
    # user, while the heavy backlog still waits.
    assert set(light) <= set(batches[0]) | set(batches[1])
    assert all(set(batch) & set(heavy) for batch in batches[:2])
    order = ["light" if row.id in light else "heavy" for row in rows]
    assert "light" not in order[7:], order
    assert order.count("heavy") == 6 and order[-1] == "heavy"
