"""Property-based tests of the live service from its own OpenAPI document (schemathesis).

Proves: for inputs generated from the document, valid and invalid alike, the service never
answers 5xx, and every answer (status, content type, body, headers) is one the document
declares. The service runs on PostgreSQL with the shipped price table, over real HTTP;
a user with credits exists, so submits can succeed as well as be refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ai_handler_dagster import ledger
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import session_scope
from tests.support.api import Api, running_api
from tests.support.db import emptied
from tests.support.webhooks import SECRET


@pytest.fixture(scope="module")
def live(db_url: str) -> Iterator[tuple[Api, str]]:
    # With a webhook secret, as in production: unsigned deliveries are refused (401), not 503.
    patch = pytest.MonkeyPatch()
    patch.setenv("AI_HANDLER_WEBHOOK_SECRET", SECRET)
    engine = emptied(db_url)
    with session_scope(engine) as session:
        for user in ("alice", "bob"):
            ledger.grant(session, user, 1_000_000, f"fuzz-grant-{user}")
    try:
        with running_api(engine) as api:
            yield api, api.key(keys.ADMIN)
    finally:
        patch.undo()


def _operations(api: Api) -> list[Any]:
    loaded = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def test_no_server_error_and_every_answer_is_documented(live: tuple[Api, str]) -> None:
    # schemathesis's pytest plugin (from_fixture) does not run under this pytest, so each
    # operation's strategy is driven by hypothesis directly: the same cases and checks.
    api, key = live
    operations = _operations(api)
    assert len(operations) >= 4, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=api.url,
                headers={"Authorization": f"Bearer {key}"},
                # The service refuses more than JSON Schema can say (control characters anywhere
                # in an input, nesting depth, a user without credits): a schema-valid request may
                # rightly be refused. Every answer must still be one the document declares.
                excluded_checks=[positive_data_acceptance],
            )

        check()
