"""The Replicate client runs deployments, and never pays twice nor takes another's prediction.

Pure units: which listed predictions a reference may take (``listed_match``): a deployment's
names its deployment, a plain model's names none, and one that names none cannot be told from
a deployment's whose list left the field out.

Over real HTTP against the Replicate emulator: a ``deployment:owner/name`` create goes to the
deployments endpoint and answers the deployment's model and version, with ``Cancel-After``; an
unknown deployment is ``model_not_found`` and creates nothing; a dropped create on a deployment
is adopted, not created again; the list sweep sees deployment predictions; and a lost create's
candidates never mix a deployment's predictions with the plain model's, another deployment's
or the website's, and a prediction that names no deployment is only ``indistinct``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ai_handler_dagster import errors
from ai_handler_dagster.devstack.emulator import MODELS, Faults
from ai_handler_dagster.domain import parse_model_ref
from ai_handler_dagster.errors import GenerationError
from ai_handler_dagster.replicate.client import INDISTINCT, MATCH, OTHER, listed_match
from ai_handler_dagster.replicate.waiting import ListSweep, wait_many
from tests.support.replicate import IMAGE, SMALL, MakeClient, emulated_by_id, requests_to

SKETCHER = "deployment:acme/sketcher"
OTHER_FLEET = "deployment:acme/other-fleet"
VERSION = MODELS[IMAGE].version_id


@pytest.fixture
def deployed(emulator: Any) -> Any:
    emulator.configure(deployments={"acme/sketcher": IMAGE, "acme/other-fleet": IMAGE})
    return emulator


@pytest.mark.parametrize(
    ("ref", "item", "names", "verdict"),
    [
        # A deployment's prediction: its name decides, whatever the model.
        (SKETCHER, {"model": IMAGE, "deployment": "acme/sketcher"}, None, MATCH),
        (SKETCHER, {"model": "x/y", "deployment": "acme/sketcher"}, {IMAGE}, MATCH),
        (SKETCHER, {"model": IMAGE, "deployment": "sketcher"}, None, MATCH),
        (SKETCHER, {"model": IMAGE, "deployment": "acme/other-fleet"}, None, OTHER),
        (SKETCHER, {"model": IMAGE, "deployment": "other-fleet"}, None, OTHER),
        (SKETCHER, {"model": IMAGE, "deployment": "other/sketcher"}, None, OTHER),
        # Named by none: the plain model's, or this deployment's on a list that left it out.
        (SKETCHER, {"model": IMAGE}, None, INDISTINCT),
        (SKETCHER, {"model": IMAGE, "deployment": None}, {IMAGE}, INDISTINCT),
        (SKETCHER, {"model": IMAGE, "deployment": ""}, None, INDISTINCT),
        # ... unless the deployment's creates were answered under other names.
        (SKETCHER, {"model": IMAGE}, {"demo/haiku-text"}, OTHER),
        (SKETCHER, {"model": ["not", "a", "name"]}, {IMAGE}, OTHER),
        (SKETCHER, {"model": ["not", "a", "name"]}, None, INDISTINCT),
        # A model reference never takes a deployment's prediction.
        (IMAGE, {"model": IMAGE, "deployment": "acme/sketcher"}, None, OTHER),
        (f"{IMAGE}:{VERSION}", {"version": VERSION, "deployment": "acme/sketcher"}, None, OTHER),
        (IMAGE, {"model": IMAGE}, None, MATCH),
        (IMAGE, {"model": "demo/alias"}, {"demo/alias"}, MATCH),
        (IMAGE, {"model": "demo/alias"}, {"x/y"}, OTHER),
        (f"{IMAGE}:{VERSION}", {"model": IMAGE, "version": VERSION}, None, MATCH),
        (f"{IMAGE}:{VERSION}", {"model": IMAGE, "version": "hidden"}, None, OTHER),
    ],
)
def test_which_listed_predictions_a_reference_may_take(
    ref: str, item: dict[str, Any], names: set[str] | None, verdict: str
) -> None:
    assert listed_match(parse_model_ref(ref), item, names) == verdict


def test_a_deployment_create_goes_to_its_endpoint(deployed: Any, make_client: MakeClient) -> None:
    client = make_client(cancel_after_s=600)
    made = client.create(SKETCHER, {"prompt": "a fleet", **SMALL})
    # The answer names the model and version the deployment runs.
    assert (made.model, made.version) == (IMAGE, VERSION)
    assert requests_to(deployed, "POST /v1/deployments/{owner}/{name}/predictions") == 1
    assert requests_to(deployed, "POST /v1/models") == requests_to(deployed, "POST /v1/pred") == 0
    emulated = emulated_by_id(deployed)[made.id]
    assert emulated["deployment"] == "acme/sketcher"
    assert emulated["_emulator"]["deadline_s"] == 600  # Cancel-After, as on every create
    # Waited for through the list, one request for the page instead of GETs.
    sweep = ListSweep(client, [made.id], min_interval_s=0.05)
    [done] = list(wait_many(client, [made.id], sweep=sweep))
    assert done.status == "succeeded" and sweep.covers(made.id)
    assert requests_to(deployed, "GET /v1/predictions/{id}") == 0


def test_an_unknown_deployment_is_model_not_found_and_creates_nothing(
    deployed: Any, make_client: MakeClient
) -> None:
    with pytest.raises(GenerationError) as info:
        make_client().create("deployment:acme/nope", {"prompt": "x", **SMALL})
    assert info.value.code == errors.MODEL_NOT_FOUND and not info.value.retryable
    assert "acme/nope does not exist" in info.value.message
    assert deployed.stats()["creates"] == 0


def test_a_dropped_deployment_create_is_adopted_not_created_again(
    deployed: Any, make_client: MakeClient
) -> None:
    """Regression target: a create whose answer is lost must not start a second paid
    prediction, on the deployments endpoint as on the model's."""
    client = make_client()
    request = {"prompt": "dropped on a deployment", "seed": 4, **SMALL}
    # The plain model's prediction of the same input, made a moment before: not a candidate.
    plain = client.create(IMAGE, request)
    deployed.configure(faults=Faults(drop_create_rate=1.0))
    started = time.time()

    def adopt() -> Any:
        search = client.lost_create_search(SKETCHER, request, started_at=started, model_names=None)
        assert [c.id for c in search.indistinct] == [plain.id]
        return search.candidates[0] if search.candidates else None

    adopted = client.create(SKETCHER, request, adopt=adopt)
    stats = deployed.stats()
    assert stats["creates"] == 2 and stats["create_responses_dropped"] == 1
    emulated = emulated_by_id(deployed)
    assert set(emulated) == {plain.id, adopted.id}
    assert emulated[adopted.id]["deployment"] == "acme/sketcher"
    assert emulated[adopted.id]["_emulator"]["response_dropped"] is True


def test_candidates_never_mix_deployments_models_and_the_website(
    deployed: Any, make_client: MakeClient
) -> None:
    client = make_client()
    request = {"prompt": "one input, four ways", "seed": 2, **SMALL}
    started = time.time()
    mine = client.create(SKETCHER, request)
    theirs = client.create(OTHER_FLEET, request)
    plain = client.create(IMAGE, request)
    web = deployed.web_prediction(IMAGE, request)

    def search(ref: str, names: set[str] | None = None) -> tuple[list[str], list[str]]:
        found = client.lost_create_search(ref, request, started_at=started, model_names=names)
        return [c.id for c in found.candidates], [c.id for c in found.indistinct]

    assert search(SKETCHER) == ([mine.id], [plain.id])
    assert search(SKETCHER, {IMAGE}) == ([mine.id], [plain.id])
    assert search(OTHER_FLEET) == ([theirs.id], [plain.id])
    assert search(IMAGE) == ([plain.id], [])
    assert search(f"{IMAGE}:{VERSION}") == ([plain.id], [])
    assert web["id"] not in {i for ids in search(SKETCHER) for i in ids}
    # The compatible view: the candidates alone.
    assert [
        c.id
        for c in client.lost_create_candidates(
            SKETCHER, request, started_at=started, model_names=None
        )
    ] == [mine.id]


def test_a_list_that_does_not_name_deployments_makes_them_indistinct(
    deployed: Any, make_client: MakeClient
) -> None:
    deployed.configure(name_deployments=False)
    client = make_client()
    request = {"prompt": "unnamed", **SMALL}
    started = time.time()
    mine = client.create(SKETCHER, request)
    plain = client.create(IMAGE, request)
    found = client.lost_create_search(SKETCHER, request, started_at=started, model_names=None)
    assert found.candidates == []
    assert sorted(c.id for c in found.indistinct) == sorted([mine.id, plain.id])
    # The plain model's search cannot tell either: both look like its own.
    plain_found = client.lost_create_search(IMAGE, request, started_at=started, model_names=None)
    assert sorted(c.id for c in plain_found.candidates) == sorted([mine.id, plain.id])
