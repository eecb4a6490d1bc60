"""End to end: reprocessing a day of failed generations with a backfill launched through
Dagster's GraphQL API, against a real webserver and daemon (``dagster dev``).

The emulator first fails every prediction (its failure rate set to 1 through its control
endpoint), so today's requests end ``failed`` and refunded; then the failure rate goes back to 0
and a ``launchPartitionBackfill`` of ``reprocess_day_job`` for today's partition is sent to the
webserver, as the UI does. Proves that the backfill's run re-queues those generations as new
attempts and that they then succeed with their outputs in S3, each attempt holding credits once
(the failed attempt's hold released, the new one captured), that a failed generation of another
day is left alone, and that the ledger verifies clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ai_handler_dagster.devstack.stack import free_port, wait_for_port
from tests.support.stack import (
    App,
    StackUnderTest,
    emulator,
    graphql,
    predictions_with_prompt,
    running_stack,
    s3_body,
    s3_keys,
    sha256,
    stack_config,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e

GRANT = 200

LOCATION = "ai_handler"
REPOSITORY = "__repository__"

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries { name loadStatus locationOrLoadError { __typename } }
    }
  }
}
"""

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""

BACKFILL_RUNS = """
query BackfillRuns($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      partitionNames
      runs { runId status jobName tags { key value } }
    }
    ... on PythonError { message }
  }
}
"""


@dataclass
class WebStack(StackUnderTest):
    """A ``dagster dev`` stack and its webserver's URL."""

    webserver_url: str = ""


def location_loaded(url: str) -> bool:
    data = graphql(url, WORKSPACE_QUERY, {})["workspaceOrError"]
    entries = data.get("locationEntries") or []
    return any(
        entry["name"] == LOCATION
        and entry["loadStatus"] == "LOADED"
        and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        for entry in entries
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    port = free_port()
    config = stack_config(tmp_path_factory.mktemp("stack-web"), webserver_port=port)
    with running_stack(config) as stack:
        url = f"http://127.0.0.1:{port}"
        wait_for_port("127.0.0.1", port, 120, stack.processes["dagster-dev"])
        wait_for(
            lambda: location_loaded(url),
            timeout_s=120,
            interval_s=1,
            what="the webserver to load the code location",
        )
        yield WebStack(stack, App(stack.app_db_url), url)


def backfill(url: str, backfill_id: str) -> dict[str, Any]:
    result = graphql(url, BACKFILL_RUNS, {"id": backfill_id})["partitionBackfillOrError"]
    assert result["__typename"] == "PartitionBackfill", result
    return result


def test_a_backfill_of_today_requeues_failed_generations_and_they_succeed(env: WebStack) -> None:
    stack, app = env.stack, env.app
    user = unique("carol")
    app.grant(user, GRANT)
    now = datetime.now(UTC)
    prompts = [f"a harbour at dawn ({user})", f"a paper boat ({user})"]

    with emulator(stack) as control:
        control.configure(faults={"failure_rate": 1.0})
        try:
            ids = [app.insert(user, "demo/pixel-sketch", {"prompt": p, "seed": 2}) for p in prompts]
            first = app.wait_terminal(ids)
        finally:
            control.configure(faults={"failure_rate": 0.0})
    assert [(first[i].status, first[i].error_code) for i in ids] == [
        ("failed", "prediction_failed")
    ] * 2
    assert app.balance(user).balance == GRANT
    # A failure of yesterday, which today's backfill must leave alone.
    yesterday = app.insert(
        user,
        "demo/pixel-sketch",
        {"prompt": f"an old failure ({user})"},
        status="failed",
        created_at=now - timedelta(days=1),
    )

    today = now.date().isoformat()
    launched = graphql(
        env.webserver_url,
        LAUNCH_BACKFILL,
        {
            "params": {
                "selector": {
                    "partitionSetName": "reprocess_day_job_partition_set",
                    "repositorySelector": {
                        "repositoryLocationName": LOCATION,
                        "repositoryName": REPOSITORY,
                    },
                },
                "partitionNames": [today],
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    # The backfill daemon submits the partition's run; it re-queues; the sensor runs them again.
    def succeeded_again() -> bool:
        rows = app.rows(ids)
        return all(r.attempt == 2 and r.status == "succeeded" for r in rows.values())

    wait_for(
        succeeded_again,
        timeout_s=180,
        interval_s=0.5,
        what="the backfilled generations to succeed",
        describe=lambda: {
            "generations": {r.id: (r.attempt, r.status) for r in app.rows(ids).values()},
            "backfill": backfill(env.webserver_url, backfill_id),
        },
    )

    def backfill_run_done() -> list[dict[str, Any]] | None:
        runs = backfill(env.webserver_url, backfill_id)["runs"]
        return runs if runs and all(r["status"] == "SUCCESS" for r in runs) else None

    [run] = wait_for(backfill_run_done, timeout_s=60, what=f"the run of backfill {backfill_id}")
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["jobName"] == "reprocess_day_job"
    assert (tags["dagster/backfill"], tags["dagster/partition"]) == (backfill_id, today)

    rows = app.rows(ids)
    for gid, prompt in zip(ids, prompts, strict=True):
        row = rows[gid]
        assert s3_keys(stack, f"generations/{gid}/") == [f"generations/{gid}/a2/0.png"]
        [obj] = row.outputs or []
        assert sha256(s3_body(stack, obj["key"])) == obj["sha256"]
        # Two attempts, two paid predictions, two holds: the failed one released, the new one
        # captured once.
        predictions = predictions_with_prompt(stack, prompt)
        assert [p["status"] for p in predictions] == ["failed", "succeeded"]
        assert predictions[1]["id"] == row.prediction_id
        old_hold, new_hold = app.holds(gid)
        assert app.entry_kinds(old_hold.id) == ["hold", "release"]
        assert app.entry_kinds(new_hold.id) == ["hold", "capture"]
        assert new_hold.id == row.hold_id

    untouched = app.row(yesterday)
    assert (untouched.status, untouched.attempt) == ("failed", 1)
    charged = sum(r.amount_charged for r in rows.values())
    balance = app.balance(user)
    assert (balance.balance, balance.held) == (GRANT - charged, 0)
    assert charged == 10
    assert app.violations() == []
