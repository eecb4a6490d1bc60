"""The Replicate resource is Dagster config for the client: its fields are the client's settings
(the same names and defaults), the token stays out of its repr, and the client it makes works
inside a Dagster job. What the client itself does is tested in the other modules of this folder."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings
from ai_handler_dagster.replicate.waiting import wait
from ai_handler_dagster.resources.replicate import ReplicateResource
from tests.support.replicate import IMAGE, SMALL

#: The resource's config fields: public (Definitions, the Launchpad), never renamed.
CONFIG_FIELDS = [
    "api_token",
    "base_url",
    "timeout_s",
    "create_attempts",
    "request_attempts",
    "retry_backoff_s",
    "poll_initial_s",
    "poll_max_s",
    "webhook_fallback_s",
    "deadline_s",
    "cancel_after_s",
    "adopt_window_s",
    "poll_workers",
]


def test_token_is_not_in_resource_repr() -> None:
    resource = ReplicateResource(api_token="r8_supersecret_value")
    assert "r8_supersecret_value" not in repr(resource)
    assert "r8_supersecret_value" not in str(resource)


def test_the_config_is_the_client_settings() -> None:
    """Every config field is a setting of the client, with the same default, and
    ``get_client`` carries each value over."""
    assert list(ReplicateResource.model_fields) == CONFIG_FIELDS
    assert [f.name for f in dataclasses.fields(ReplicateSettings)] == CONFIG_FIELDS
    assert ReplicateResource().get_client().settings == ReplicateSettings()
    values: dict[str, Any] = {
        "api_token": "r8_token",
        "base_url": "http://127.0.0.1:9",
        "timeout_s": 3.0,
        "create_attempts": 2,
        "request_attempts": 3,
        "retry_backoff_s": 0.1,
        "poll_initial_s": 0.2,
        "poll_max_s": 4.0,
        "webhook_fallback_s": 5.0,
        "deadline_s": 60.0,
        "cancel_after_s": None,
        "adopt_window_s": 7.0,
        "poll_workers": 2,
    }
    client = ReplicateResource(**values).get_client()
    assert isinstance(client, ReplicateClient)
    assert dataclasses.asdict(client.settings) == values
    assert "r8_token" not in repr(client)


def test_resource_in_a_dagster_job(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wired as Definitions wire it (token through EnvVar), the resource works inside an op."""
    import dagster as dg

    monkeypatch.setenv("REPLICATE_API_TOKEN", emulator.token)

    @dg.op
    def run_one(replicate: ReplicateResource) -> str:
        client = replicate.get_client()
        snapshot = client.create(IMAGE, {"prompt": "inside dagster", **SMALL})
        return wait(client, snapshot.id, deadline_s=20).status

    @dg.job
    def one_prediction() -> None:
        run_one()

    resource = ReplicateResource(
        api_token=dg.EnvVar("REPLICATE_API_TOKEN"), base_url=emulator.base_url, poll_max_s=0.3
    )
    result = one_prediction.execute_in_process(resources={"replicate": resource})
    assert result.success and result.output_for_node("run_one") == "succeeded"
    assert len(emulator.predictions()) == 1
