"""Settings of the Replicate emulator: how fast its models run and which faults it injects.

Everything here can change while the emulator runs (``EmulatorHandle.configure`` or
``POST /_emulator/config``), so tests can steer a live server the way an outage would.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .models import MODELS, DemoModel

DEFAULT_TOKEN = "r8_emulator_token"


@dataclass(frozen=True)
class Faults:
    """Fault injection rates (each a probability in ``0..1``) and the seed that schedules them.

    Every kind of fault draws from its own random stream seeded from ``seed``, so the same
    sequence of requests meets the same faults on every run, and turning one fault on does not
    reshuffle the others.
    """

    failure_rate: float = 0.0
    """The model fails: status ``failed`` with an ``error`` message after running (it is paid)."""
    http_500_rate: float = 0.0
    """Any ``/v1`` request or output download answers 500 before doing anything."""
    http_429_rate: float = 0.0
    """Creates and prediction gets answer 429 "Request was throttled" with ``Retry-After``."""
    stuck_rate: float = 0.0
    """The prediction starts processing and never finishes until canceled (or its deadline)."""
    slow_rate: float = 0.0
    """The prediction runs ``slow_factor`` times longer than ``latency_s``."""
    slow_factor: float = 10.0
    drop_create_rate: float = 0.0
    """The create really happens, then the connection closes without any response."""
    remove_output_rate: float = 0.0
    """Outputs are deleted right after success (``data_removed``), before anyone downloads them."""
    retry_after_s: int = 1
    """The ``Retry-After`` value sent with injected 429s (the client sleeps that long)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_rate"):
                value = float(getattr(self, f.name))  # JSON controls may send 1 for 1.0
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"Faults.{f.name} must be within 0..1, got {value!r}")
                object.__setattr__(self, f.name, value)
        if self.slow_factor < 1.0:
            raise ValueError("Faults.slow_factor must be >= 1")
        if self.retry_after_s < 0:
            raise ValueError("Faults.retry_after_s must be >= 0")


_DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def deployment_target(target: object) -> DemoModel:
    """The demo model a deployment's ``owner/name[:version]`` names; ``ValueError`` if none."""
    model_ref, _, version = str(target).partition(":")
    model = MODELS.get(model_ref)
    if model is None or (version and version != model.version_id):
        known = ", ".join(sorted(MODELS))
        raise ValueError(
            f"a deployment runs one of the demo models ({known}), optionally with its version; "
            f"got {target!r}"
        )
    return model


def default_webhook_secret(token: str) -> str:
    """A stable ``whsec_`` secret derived from the token.

    Stable so a stack that restarts the emulator keeps validating webhooks with the secret it
    already knows; still fetchable from ``GET /v1/webhooks/default/secret`` like on Replicate.
    """
    digest = hashlib.sha256(f"emulator-webhook-secret:{token}".encode()).digest()[:24]
    return "whsec_" + base64.b64encode(digest).decode()


#: The kinds of broken ``GET /v1/predictions/{id}`` answers ``EmulatorConfig.garbled`` can give.
GARBLED_ANSWERS = ("html", "no-id", "deep")


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves. All fields except ``token`` and ``webhook_secret`` may change
    at runtime."""

    latency_s: float = 1.0
    """Model run time of one prediction once it has a hardware slot."""
    latency_jitter: float = 0.0
    """Relative spread of the run time (0.2 = plus or minus 20 %), drawn from the fault seed."""
    concurrency: int = 8
    """Hardware cap: predictions beyond it wait in the queue with status ``starting``."""
    faults: Faults = field(default_factory=Faults)
    retention_s: float = 3600.0
    """Seconds after completion before outputs are deleted (``data_removed``)."""
    token: str = DEFAULT_TOKEN
    """The one API token accepted as ``Authorization: Bearer <token>``."""
    webhook_secret: str | None = None
    """``whsec_<base64>`` signing secret; default derived from the token."""
    page_size: int = 100
    """Predictions per page of ``GET /v1/predictions`` (Replicate uses 100)."""
    rate_limit: bool = False
    """Enforce the per-minute limits below with real 429s (headers are always sent)."""
    creates_per_minute: int = 600
    requests_per_minute: int = 3000
    creates_burst: int | None = None
    """Most creates let through at once (the bucket's size); default: a minute's worth."""
    requests_burst: int | None = None
    """Most other requests let through at once; default: a minute's worth."""
    cancel_lag_s: float = 0.0
    """Seconds a cancel takes to land: the cancel's answer shows the prediction still running
    (as Replicate's may), and it ends ``canceled`` that much later (0: at once)."""
    public_base_url: str | None = None
    """Base URL written into prediction URLs, output URLs and cursors (default: bound address)."""
    official_models: tuple[str, ...] = ()
    """Models that behave like Replicate's official ones: predictions created by model path
    report ``version: "hidden"``."""
    model_aliases: dict[str, str] = field(default_factory=dict)
    """Model -> the name predictions created by its model path answer with, as Replicate does
    for some official models (``{"demo/pixel-sketch": "demo/pixel-sketch-official"}``)."""
    deployments: dict[str, str] = field(default_factory=dict)
    """Deployment ``owner/name`` -> the demo model it runs, ``owner/name`` or
    ``owner/name:version`` (``{"acme/sketcher": "demo/pixel-sketch"}``). Its predictions report
    that model and its version (never ``hidden``, never an alias), as Replicate's do; changing
    the model of a deployment at runtime makes a new release."""
    name_deployments: bool = True
    """Predictions made through a deployment name it (``deployment: "owner/name"``) in every
    answer, list and webhook, as Replicate's API describes; ``False`` leaves the field out, as
    a provider whose answers do not say would."""
    garbled: dict[str, str] = field(default_factory=dict)
    """Prediction id -> how its ``GET`` is answered instead of the prediction, as a broken proxy
    or API could: ``html`` (200 with an HTML page), ``no-id`` (200 JSON without ``id`` and
    ``status``) or ``deep`` (200, the prediction with an output nested 5000 levels deep)."""
    webhook_max_attempts: int = 4
    webhook_retry_delay_s: float = 0.5
    """Delay before the first webhook retry; doubles on each further retry."""
    webhook_timeout_s: float = 5.0
    webhook_workers: int = 4
    render_workers: int = 2

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        if self.cancel_lag_s < 0:
            raise ValueError("cancel_lag_s must be >= 0")
        if not 0 <= self.latency_jitter <= 1:
            raise ValueError("latency_jitter must be within 0..1")
        if self.concurrency < 0:
            raise ValueError("concurrency must be >= 0")
        if self.retention_s < 0:
            raise ValueError("retention_s must be >= 0")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.webhook_max_attempts < 1:
            raise ValueError("webhook_max_attempts must be >= 1")
        if self.webhook_workers < 1 or self.render_workers < 1:
            raise ValueError("webhook_workers and render_workers must be >= 1")
        secret = self.webhook_secret or default_webhook_secret(self.token)
        if not secret.startswith("whsec_"):
            raise ValueError("webhook_secret must look like whsec_<base64>")
        base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        object.__setattr__(self, "webhook_secret", secret)
        object.__setattr__(self, "official_models", tuple(self.official_models))
        unknown = set(self.garbled.values()) - set(GARBLED_ANSWERS)
        if unknown:
            raise ValueError(f"garbled answers must be one of {GARBLED_ANSWERS}: {unknown}")
        if isinstance(self.faults, dict):
            object.__setattr__(self, "faults", Faults(**self.faults))
        object.__setattr__(self, "deployments", dict(self.deployments))
        for name, target in self.deployments.items():
            if not _DEPLOYMENT_NAME.fullmatch(str(name)):
                raise ValueError(f"deployment name {name!r} is not owner/name")
            deployment_target(target)  # raises ValueError for an unknown model

    @property
    def signing_secret(self) -> str:
        """The webhook secret, never ``None`` after construction."""
        assert self.webhook_secret is not None
        return self.webhook_secret

    def updated(self, **changes: Any) -> EmulatorConfig:
        """A copy with ``changes`` applied; ``faults`` may be a ``Faults`` or a partial dict."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown emulator settings: {', '.join(sorted(unknown))}")
        frozen = {"token", "webhook_secret"} & {k for k, v in changes.items() if v is not None}
        if frozen:
            raise ValueError(f"cannot change {', '.join(sorted(frozen))} at runtime")
        faults = changes.get("faults")
        if isinstance(faults, dict):
            changes["faults"] = dataclasses.replace(self.faults, **faults)
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (the token and secret are left out: they are not settings)."""
        data = dataclasses.asdict(self)
        data.pop("token")
        data.pop("webhook_secret")
        return data
