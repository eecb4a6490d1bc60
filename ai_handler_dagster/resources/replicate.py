"""The Replicate resource: the provider's settings as Dagster config, and the client they make.

Thin, as dagster-aws's ``S3Resource`` is: the fields below are the public config (set them in
``Definitions`` or the Launchpad), and :meth:`ReplicateResource.get_client` returns a plain
:class:`~ai_handler_dagster.replicate.client.ReplicateClient` built from them. Everything the
client does (create with adoption, get, cancel, waiting) lives in the Dagster-free
``ai_handler_dagster.replicate`` package.
"""

from __future__ import annotations

import dataclasses

import dagster as dg
from pydantic import Field

from ai_handler_dagster.replicate.client import ReplicateClient, ReplicateSettings

#: The defaults of every field, defined once by the client's settings.
_DEFAULTS = ReplicateSettings()


class ReplicateResource(dg.ConfigurableResource):
    """Replicate's settings; :meth:`get_client` makes the client that creates, watches and
    cancels predictions (every failure a ``GenerationError``).

    Clients share one HTTP connection pool per (base URL, token): get one wherever it is
    needed, from any thread.
    """

    api_token: str | None = Field(
        default=_DEFAULTS.api_token,
        repr=False,
        description=(
            "Replicate API token. Set it with EnvVar('REPLICATE_API_TOKEN'); it is never logged. "
            "Unset, every call to the provider fails as unauthorized."
        ),
    )
    base_url: str = Field(
        default=_DEFAULTS.base_url,
        description="API root (the emulator's URL in the embedded stack). Paths start with /v1.",
    )
    timeout_s: float = Field(
        default=_DEFAULTS.timeout_s,
        gt=0,
        description="Read/write timeout of one HTTP request in seconds (connect: at most 5 s).",
    )
    create_attempts: int = Field(
        default=_DEFAULTS.create_attempts,
        ge=1,
        description=(
            "Attempts of one create on 429, 5xx, timeouts and dropped connections. A create "
            "whose answer was lost is found and adopted rather than repeated."
        ),
    )
    request_attempts: int = Field(
        default=_DEFAULTS.request_attempts,
        ge=1,
        description="Attempts of one get, cancel or list on transient errors.",
    )
    retry_backoff_s: float = Field(
        default=_DEFAULTS.retry_backoff_s,
        gt=0,
        description="First retry delay; doubles per attempt, with jitter (Retry-After wins).",
    )
    poll_initial_s: float = Field(
        default=_DEFAULTS.poll_initial_s,
        gt=0,
        description="First polling interval of a prediction; grows x1.5 per poll.",
    )
    poll_max_s: float = Field(
        default=_DEFAULTS.poll_max_s,
        gt=0,
        description="Longest polling interval; also the interval when a webhook is expected.",
    )
    webhook_fallback_s: float = Field(
        default=_DEFAULTS.webhook_fallback_s,
        gt=0,
        description=(
            "When webhooks are expected, poll the API for a prediction only this often, as a "
            "safety net for a webhook that never arrives."
        ),
    )
    deadline_s: float = Field(
        default=_DEFAULTS.deadline_s,
        gt=0,
        description=(
            "Default time a prediction may take from when wait_many starts watching it; past "
            "it the prediction is canceled and reported as deadline_exceeded."
        ),
    )
    cancel_after_s: float | None = Field(
        default=_DEFAULTS.cancel_after_s,
        description=(
            "Sent as the Cancel-After header of every create: the provider cancels the "
            "prediction by itself after this many seconds, even if this process died. Keep it "
            "above deadline_s; null disables it."
        ),
    )
    adopt_window_s: float = Field(
        default=_DEFAULTS.adopt_window_s,
        ge=0,
        description=(
            "Clock allowance between us and the provider when looking for a lost create: "
            "predictions created up to this many seconds before the attempt's first create "
            "are candidates for adoption (the nearest in time is taken first)."
        ),
    )
    poll_workers: int = Field(
        default=_DEFAULTS.poll_workers,
        ge=1,
        description="Threads wait_many uses for concurrent GETs, whatever the number of ids.",
    )

    def get_client(self) -> ReplicateClient:
        """A client with these settings (cheap: no connection is made here)."""
        return ReplicateClient(
            ReplicateSettings(
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(ReplicateSettings)}
            )
        )
