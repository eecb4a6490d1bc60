"""Configuration: the one environment switch, the production instance file, the definitions.

Proves that an unknown environment is an error (never a silent default), that production refuses
to start without its database URL, and that the definitions load in both environments
with the Replicate token kept an ``EnvVar`` (never a literal in config).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ai_handler_dagster import settings

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_HANDLER_ENV", "staging")
    with pytest.raises(settings.ConfigError, match="staging"):
        settings.environment()


def test_production_needs_its_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_HANDLER_ENV", "production")
    monkeypatch.delenv("AI_HANDLER_DATABASE_URL", raising=False)
    with pytest.raises(settings.ConfigError, match="AI_HANDLER_DATABASE_URL"):
        settings.database_url()


@pytest.mark.parametrize(
    ("name", "value"),
    [("AI_HANDLER_MAX_BATCH", "0"), ("AI_HANDLER_MAX_BATCH", "many"), ("AI_HANDLER_EXECUTOR", "x")],
)
def test_bad_settings_say_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(settings.ConfigError, match=name):
        settings.max_batch_size() if "BATCH" in name else settings.executor()


@pytest.mark.parametrize("env", ["embedded", "production"])
def test_definitions_load_with_the_token_as_an_env_var(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv("AI_HANDLER_ENV", env)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_never_in_config")
    import ai_handler_dagster.definitions as definitions

    module = importlib.reload(definitions)
    replicate = module.defs.resources["replicate"]
    # Still an EnvVar, not the value: Dagster reads it at run time and hides it in the UI.
    assert "r8_never_in_config" not in repr(replicate.api_token)
    assert set(module.defs.resources) >= {
        "database",
        "pricing",
        "replicate",
        "output_policy",
        "outputs_io_manager",
        "io_manager",
    }
    job = module.defs.get_job_def("generation_job")
    assert [n.name for n in job.graph.nodes_in_topological_order] == [
        "reserve_credits",
        "create_predictions",
        "await_predictions",
        "store_outputs",
        "finalize",
    ]
    assert job.executor_def.name == "in_process"
