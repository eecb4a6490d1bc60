"""The domain's vocabulary: one parser, one identifier check, statuses the database enforces,
and one base class for the project's own errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings

import pytest
import sqlalchemy as sa

import ai_handler_dagster
from ai_handler_dagster import generations as gens
from ai_handler_dagster import ledger
from ai_handler_dagster.db.models import Base
from ai_handler_dagster.domain import (
    IN_FLIGHT,
    TERMINAL,
    UNSUCCESSFUL,
    AttemptState,
    EntryKind,
    GenerationStatus,
    HoldStatus,
    InvalidModelRef,
    InvalidText,
    check_identifier,
    parse_model_ref,
)
from ai_handler_dagster.errors import AiHandlerError, GenerationError
from ai_handler_dagster.pricing import parse_pricing
from ai_handler_dagster.replicate import client as rr


def test_model_ref_parsing() -> None:
    ref = parse_model_ref("stability-ai/sdxl:abc123")
    assert (ref.owner, ref.name, ref.version, ref.base) == (
        "stability-ai",
        "sdxl",
        "abc123",
        "stability-ai/sdxl",
    )
    assert str(parse_model_ref("a/b")) == "a/b"


@pytest.mark.parametrize(
    "ref",
    ["a/b", "owner/name:0123abcd", "black-forest-labs/flux-1.1-pro", "a_b/c.d:v1"],
)
def test_the_price_table_and_the_provider_client_accept_the_same_references(ref: str) -> None:
    # Two parsers used to disagree (different regexes, results and errors): a reference the
    # price table accepted could still be refused by the client, or the other way round.
    parse_pricing(f'[models."{ref}"]\ncredits = 1\n')
    assert rr.checked_model_ref(ref) == parse_model_ref(ref)


@pytest.mark.parametrize("ref", ["not a model", " a/b", "a/b ", "_a/b", "a/b/c", "a/b:", "é/b"])
def test_a_malformed_reference_is_refused_by_both(ref: str) -> None:
    with pytest.raises(InvalidModelRef):
        parse_model_ref(ref)
    with pytest.raises(GenerationError):
        rr.checked_model_ref(ref)


def test_a_deployment_reference_names_the_deployment() -> None:
    ref = parse_model_ref("deployment:acme/sketcher-v2.1")
    assert (ref.owner, ref.name, ref.version, ref.deployment) == (
        "acme",
        "sketcher-v2.1",
        None,
        True,
    )
    assert (ref.path, ref.base, str(ref)) == (
        "acme/sketcher-v2.1",
        "deployment:acme/sketcher-v2.1",
        "deployment:acme/sketcher-v2.1",
    )
    # The model of the same name is another reference.
    assert parse_model_ref("acme/sketcher-v2.1") != ref
    assert not parse_model_ref("acme/sketcher-v2.1").deployment


@pytest.mark.parametrize("ref", ["deployment:acme/sketcher", "deployment:a_b/c.d"])
def test_every_parser_accepts_a_deployment_reference(ref: str) -> None:
    parse_pricing(f'[models."{ref}"]\ncredits = 1\n')
    assert rr.checked_model_ref(ref) == parse_model_ref(ref)


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("deployment:acme/sketcher:abc123", "a deployment has no ':version'"),
        ("deployment:acme/sketcher:", "is not 'deployment:owner/name'"),
        ("deployment:acme", "is not 'deployment:owner/name'"),
        ("deployment:", "is not 'deployment:owner/name'"),
        ("deployment:acme/sketcher/x", "is not 'deployment:owner/name'"),
        ("deployment: acme/sketcher", "is not 'deployment:owner/name'"),
        ("deployment:acme/sketcher ", "is not 'deployment:owner/name'"),
        ("deployment:_acme/sketcher", "is not 'deployment:owner/name'"),
        ("deployment:deployment:acme/sketcher", "is not 'deployment:owner/name'"),
        ("Deployment:acme/sketcher", "the lower-case prefix 'deployment:'"),
        ("deployments:acme/sketcher", "is not 'owner/name'"),
        ("model:acme/sketcher", "is not 'owner/name'"),
    ],
)
def test_a_malformed_deployment_reference_is_refused_with_its_reason(ref: str, says: str) -> None:
    with pytest.raises(InvalidModelRef, match=re.escape(says)):
        parse_model_ref(ref)
    with pytest.raises(GenerationError, match=re.escape(says)):
        rr.checked_model_ref(ref)
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_pricing(f'[models."{ref}"]\ncredits = 1\n')


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        (7, "non-empty string"),
        ("a" * 256, "longer than 255"),
        ("tab\there", "U+0009 at position 3"),
        ("line\nbreak", "U+000A at position 4"),
        ("c1\x85", "U+0085 at position 2"),
        ("del\x7f", "U+007F at position 3"),
        ("lone\ud800", "lone surrogate"),
    ],
)
def test_one_identifier_check_for_the_ledger_and_submit(value: object, says: str) -> None:
    # The ledger and submit each had their own check: the ledger let a C1 control or a lone
    # surrogate through as a user id, which submit refused.
    says = re.escape(says)
    with pytest.raises(InvalidText, match=says):
        check_identifier(value, "user id")
    with pytest.raises(ValueError, match=says):
        ledger.grant(None, value, 1, "k")  # type: ignore[arg-type]  # refused before any query
    with pytest.raises(gens.InvalidRequest, match=says):
        gens.submit(None, user_id=value, model="a/b", input={}, prices=None)  # type: ignore[arg-type]


def _allowed(table: str, column: str) -> set[str]:
    checks = [
        c
        for c in Base.metadata.tables[table].constraints
        if isinstance(c, sa.CheckConstraint) and f"{column} IN" in str(c.sqltext)
    ]
    assert len(checks) == 1, f"{table}.{column} has one CHECK of its values"
    text = str(checks[0].sqltext)
    inner = text[text.index("(") + 1 : text.rindex(")")]
    return {item.strip().strip("'") for item in inner.split(",")}


def test_the_database_allows_exactly_the_statuses_of_the_vocabulary() -> None:
    assert _allowed("generations", "status") == {str(s) for s in GenerationStatus}
    assert _allowed("holds", "status") == {str(s) for s in HoldStatus}
    assert _allowed("ledger_entries", "kind") == {str(s) for s in EntryKind}
    assert _allowed("create_attempts", "state") == {str(s) for s in AttemptState}


def test_status_sets_partition_the_generation_statuses() -> None:
    assert set(IN_FLIGHT) | set(TERMINAL) | {GenerationStatus.PENDING} == set(GenerationStatus)
    assert not set(IN_FLIGHT) & set(TERMINAL)
    assert set(UNSUCCESSFUL) == set(TERMINAL) - {GenerationStatus.SUCCEEDED}


def _project_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(ai_handler_dagster.__path__, "ai_handler_dagster."):
        if ".devstack.emulator" in info.name or info.name.endswith("__main__"):
            continue  # the emulator stands in for the provider; its errors are not ours
        with warnings.catch_warnings():  # the deprecated launcher name warns when imported
            warnings.simplefilter("ignore", FutureWarning)
            module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, Exception)
                and obj.__module__ == module.__name__
                and not obj.__name__.startswith("_")
            ):
                found.append(obj)
    return found


def test_every_error_of_the_project_shares_one_base_class() -> None:
    exceptions = _project_exceptions()
    assert len(exceptions) >= 10
    # A provider's HTTP error subclasses the client's own error (it is turned into a
    # GenerationError before it leaves the client); everything else is ours, caught as one.
    outside = {e.__name__ for e in exceptions if not issubclass(e, AiHandlerError)}
    assert outside <= {"ProviderHTTPError"}, outside
