"""The emulator serves Replicate deployments as Replicate's API describes them.

Over real HTTP with the unmodified ``replicate`` client: ``POST
/v1/deployments/{owner}/{name}/predictions`` runs the deployment's model, and the prediction
reports that model and its version (not the deployment's name, never ``hidden``, never an
alias) and names the deployment in its ``deployment`` field, in the create answer, a get and the
list; ``GET /v1/deployments/{owner}/{name}`` shows the current release (a new one when the
deployment's model changes); an unknown deployment is a 404 and creates nothing. The
``--deployment`` option and the settings refuse what they cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from replicate.exceptions import ReplicateError

from ai_handler_dagster.devstack.emulator import MODELS, EmulatorConfig, EmulatorHandle
from ai_handler_dagster.devstack.emulator.__main__ import build_parser, config_from_args
from tests.support.emulator import client_for

SKETCH = MODELS["demo/pixel-sketch"]
HAIKU = MODELS["demo/haiku-text"]
SMALL = {"prompt": "a fox", "width": 64, "height": 64, "seed": 1}
DEPLOYED = {"acme/sketcher": "demo/pixel-sketch"}


def _get(http: httpx.Client, emulator: EmulatorHandle, path: str) -> httpx.Response:
    return http.get(
        f"{emulator.base_url}{path}", headers={"Authorization": f"Bearer {emulator.token}"}
    )


def test_a_deployment_prediction_reports_its_model_and_names_the_deployment(
    make_emulator: Callable[..., EmulatorHandle], http: httpx.Client
) -> None:
    # The model is official and has an alias: both apply to its model path only.
    emulator = make_emulator(
        deployments=DEPLOYED,
        official_models=("demo/pixel-sketch",),
        model_aliases={"demo/pixel-sketch": "demo/pixel-sketch-official"},
    )
    client = client_for(emulator)
    prediction = client.deployments.predictions.create("acme/sketcher", input=SMALL)
    assert (prediction.model, prediction.version) == ("demo/pixel-sketch", SKETCH.version_id)
    prediction.wait()
    assert prediction.status == "succeeded"
    assert prediction.output == [f"{emulator.base_url}/files/{prediction.id}/0.png"]

    raw = _get(http, emulator, f"/v1/predictions/{prediction.id}").json()
    assert (raw["model"], raw["version"], raw["deployment"], raw["source"]) == (
        "demo/pixel-sketch",
        SKETCH.version_id,
        "acme/sketcher",
        "api",
    )
    by_model = client.models.predictions.create(model="demo/pixel-sketch", input=SMALL)
    listed = {p["id"]: p for p in _get(http, emulator, "/v1/predictions").json()["results"]}
    assert listed[prediction.id]["deployment"] == "acme/sketcher"
    # The plain model's prediction of the same input names no deployment.
    assert "deployment" not in listed[by_model.id]
    assert (listed[by_model.id]["model"], listed[by_model.id]["version"]) == (
        "demo/pixel-sketch-official",
        "hidden",
    )


def test_the_deployment_shows_its_current_release(
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    emulator = make_emulator(deployments=DEPLOYED)
    client = client_for(emulator)
    deployment = client.deployments.get("acme/sketcher")
    release = deployment.current_release
    assert release is not None
    assert (deployment.owner, deployment.name) == ("acme", "sketcher")
    assert (release.number, release.model, release.version) == (
        1,
        "demo/pixel-sketch",
        SKETCH.version_id,
    )
    assert [d.id for d in client.deployments.list().results] == ["acme/sketcher"]

    # The owner points the deployment at another model: a new release, which runs it.
    emulator.configure(deployments={"acme/sketcher": f"demo/haiku-text:{HAIKU.version_id}"})
    release = client.deployments.get("acme/sketcher").current_release
    assert release is not None
    assert (release.number, release.model, release.version) == (
        2,
        "demo/haiku-text",
        HAIKU.version_id,
    )
    prediction = client.deployments.predictions.create("acme/sketcher", input={"prompt": "snow"})
    assert (prediction.model, prediction.version) == ("demo/haiku-text", HAIKU.version_id)


def test_an_unknown_deployment_is_not_found_and_creates_nothing(
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    emulator = make_emulator(deployments=DEPLOYED)
    client = client_for(emulator)
    for call in (
        lambda: client.deployments.get("acme/nope"),
        lambda: client.deployments.predictions.create("acme/nope", input=SMALL),
        # A model's name is not a deployment's.
        lambda: client.deployments.predictions.create("demo/pixel-sketch", input=SMALL),
    ):
        with pytest.raises(ReplicateError) as caught:
            call()
        assert caught.value.status == 404
        assert caught.value.detail is not None and "does not exist" in caught.value.detail
    assert emulator.stats()["creates"] == 0


def test_unnamed_deployments_leave_the_field_out(
    make_emulator: Callable[..., EmulatorHandle], http: httpx.Client
) -> None:
    emulator = make_emulator(deployments=DEPLOYED, name_deployments=False)
    prediction = client_for(emulator).deployments.predictions.create("acme/sketcher", input=SMALL)
    raw = _get(http, emulator, f"/v1/predictions/{prediction.id}").json()
    assert "deployment" not in raw and raw["model"] == "demo/pixel-sketch"


def test_the_command_line_and_the_settings_refuse_what_they_cannot_serve() -> None:
    args = build_parser().parse_args(
        [
            "--deployment",
            "acme/sketcher=demo/pixel-sketch",
            "--deployment",
            "acme/poet=demo/haiku-text",
        ]
    )
    assert config_from_args(args).deployments == {
        "acme/sketcher": "demo/pixel-sketch",
        "acme/poet": "demo/haiku-text",
    }
    for option, says in [
        ("acme/sketcher", "OWNER/NAME=MODEL"),
        ("acme/sketcher=demo/nope", "one of the demo models"),
        ("acme/sketcher=demo/pixel-sketch:0000", "one of the demo models"),
        ("sketcher=demo/pixel-sketch", "is not owner/name"),
    ]:
        with pytest.raises(ValueError, match=says):
            config_from_args(build_parser().parse_args(["--deployment", option]))
    with pytest.raises(ValueError, match="one of the demo models"):
        EmulatorConfig().updated(deployments={"acme/sketcher": "acme/unknown"})
