"""The domain's vocabulary, defined once: statuses, the sets they fall in, run tags, model
references and identifiers.

Everything here is plain Python (no Dagster, no database): the tables' CHECK constraints, the
ops, the sensors, the provider client and the proving tools all read their words from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from ai_handler_dagster.errors import AiHandlerError

# Sets of statuses are tuples: SQL ``IN`` lists then render in one stable order.

# --- statuses -----------------------------------------------------------------------------------


class GenerationStatus(StrEnum):
    """Where a generation request is: ``pending`` (submitted) -> ``queued`` (claimed into a
    batch) -> ``running`` (its run holds credits for it) -> one terminal status."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


#: Generations a run owns (claimed into a batch, not ended): the refund paths settle these.
IN_FLIGHT: Final = (GenerationStatus.QUEUED, GenerationStatus.RUNNING)
#: Generations that never change again (until an operator requeues them).
TERMINAL: Final = (GenerationStatus.SUCCEEDED, GenerationStatus.FAILED, GenerationStatus.CANCELED)
#: Generations that ended without an output (refunded); an operator may requeue them.
UNSUCCESSFUL: Final = (GenerationStatus.FAILED, GenerationStatus.CANCELED)


class HoldStatus(StrEnum):
    """A credit hold: ``pending`` until exactly one ending."""

    PENDING = "pending"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class EntryKind(StrEnum):
    """What a ledger entry records."""

    GRANT = "grant"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    EXPIRE = "expire"


#: The entries that end a hold (at most one per hold).
ENDING_KINDS: Final = (EntryKind.CAPTURE, EntryKind.RELEASE, EntryKind.EXPIRE)


class AttemptState(StrEnum):
    """A generation attempt that asked the provider for a prediction (``create_attempts``)."""

    CREATING = "creating"  # a create request is in flight
    LOST = "lost"  # a create's answer was lost: its prediction is looked for
    OWNED = "owned"  # it owns its prediction (for good)
    ABANDONED = "abandoned"  # it ended without owning one


class PredictionStatus(StrEnum):
    """A prediction's status on the provider. ``aborted`` is newer than the official client."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"


#: Predictions still running: canceling them still saves money.
PREDICTION_RUNNING: Final = (PredictionStatus.STARTING, PredictionStatus.PROCESSING)
#: Predictions that never change again.
PREDICTION_TERMINAL: Final = (
    PredictionStatus.SUCCEEDED,
    PredictionStatus.FAILED,
    PredictionStatus.CANCELED,
    PredictionStatus.ABORTED,
)


# --- run tags -----------------------------------------------------------------------------------


class RunTag:
    """The project's tags on Dagster runs (filter by them in the UI's run list)."""

    #: The batch key (the request sensor's run key) of the generations a run processes.
    BATCH: Final = "ai_handler/batch"
    BATCH_SIZE: Final = "ai_handler/batch_size"
    #: The user (or ``mixed``) and the model (``owner/name``, ``deployment:owner/name``, or
    #: ``mixed``) of a batch.
    USER: Final = "ai_handler/user"
    MODEL: Final = "ai_handler/model"
    #: ``generation`` on every run of the generation job.
    KIND: Final = "ai_handler/kind"
    #: Shows the pid of a run's worker process (forked runs only), for people and filters.
    #: Never trusted for signals or health: anyone can set a tag from the Launchpad, and a
    #: retried run copies its parent's tags.
    WORKER_PID: Final = "ai_handler/worker_pid"
    #: Dagster's own tag: its run queue starts runs with a higher value first. The request
    #: sensor sets it to the batch's priority (``MAX_PRIORITY`` for a batch claimed by aging).
    DAGSTER_PRIORITY: Final = "dagster/priority"
    #: The priority the batch's generations were requested with (one per batch).
    PRIORITY: Final = "ai_handler/priority"


# --- priorities ---------------------------------------------------------------------------------

#: A generation's priority is a whole number from ``MIN_PRIORITY`` (the default, free tier) to
#: ``MAX_PRIORITY``; the request sensor claims higher ones first. Which a user may ask for is
#: the operator's choice (``priorities.py``), never the requester's.
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 9


# --- identifiers --------------------------------------------------------------------------------


class InvalidText(AiHandlerError, ValueError):
    """An identifier or a text field the project refuses; the message says why."""


#: Longest identifier (user id, request id, idempotency key).
MAX_IDENTIFIER_LENGTH: Final = 255

# C0 controls except tab, newline and carriage return; DEL; C1 controls. Prompts with these are
# almost always corrupted or an injection attempt, never what a user typed.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_text(value: str, where: str, *, error: type[Exception] = InvalidText) -> None:
    """Refuse text that is not valid UTF-8 (a lone surrogate) or holds control characters
    other than tab, newline and carriage return; ``error`` names the position."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{where} is not valid UTF-8 (lone surrogate {value[exc.start]!r} at position "
            f"{exc.start})"
        ) from None
    bad = _CONTROL.search(value)
    if bad is not None:
        raise error(
            f"{where} contains control character U+{ord(bad.group()):04X} at position {bad.start()}"
        )


def check_identifier(
    value: object,
    what: str,
    *,
    max_length: int = MAX_IDENTIFIER_LENGTH,
    error: type[Exception] = InvalidText,
) -> str:
    """A user id, request id or idempotency key: a non-empty string of at most ``max_length``
    characters, clean text, and (since identifiers end up in logs, tags and run keys) not even a
    tab or a newline. Returns it unchanged."""
    if not isinstance(value, str) or not value.strip():
        raise error(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise error(f"{what} is longer than {max_length} characters")
    check_text(value, what, error=error)
    for position, char in enumerate(value):
        if char in "\t\n\r":
            raise error(
                f"{what} contains control character U+{ord(char):04X} at position {position}"
            )
    return value


# --- model references ---------------------------------------------------------------------------


class InvalidModelRef(AiHandlerError, ValueError):
    """A model reference that is not ``owner/name``, ``owner/name:version`` or
    ``deployment:owner/name``."""


#: The prefix of a reference to a Replicate deployment: ``deployment:owner/name``.
DEPLOYMENT_PREFIX: Final = "deployment:"

# Replicate's names: letters, digits, '.', '_' and '-', starting with a letter or digit.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_MODEL_REF = re.compile(rf"(?P<owner>{_NAME})/(?P<name>{_NAME})(?::(?P<version>{_VERSION}))?")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: a model, ``owner/name[:version]``, or a deployment,
    ``deployment:owner/name`` (``deployment`` set; a deployment has no version: it runs its
    current release, which its owner may change at any time)."""

    owner: str
    name: str
    version: str | None = None
    deployment: bool = False

    @property
    def path(self) -> str:
        """``owner/name``: the model's or the deployment's name, as the API's paths spell it."""
        return f"{self.owner}/{self.name}"

    @property
    def base(self) -> str:
        """The reference without its version: ``owner/name``, or ``deployment:owner/name``."""
        return f"{DEPLOYMENT_PREFIX}{self.path}" if self.deployment else self.path

    def __str__(self) -> str:
        return self.base if self.version is None else f"{self.base}:{self.version}"


_FORMS = "'owner/name', 'owner/name:version' or 'deployment:owner/name'"


def parse_model_ref(ref: object) -> ModelRef:
    """Parse ``owner/name``, ``owner/name:version`` or ``deployment:owner/name``;
    ``InvalidModelRef`` says what is wrong."""
    if not isinstance(ref, str):
        raise InvalidModelRef(f"model must be a string {_FORMS}, got {ref!r}")
    if ref.startswith(DEPLOYMENT_PREFIX):
        match = _MODEL_REF.fullmatch(ref.removeprefix(DEPLOYMENT_PREFIX))
        if match is None:
            raise InvalidModelRef(
                f"model {ref!r} is not 'deployment:owner/name' (letters, digits, '.', '_' and "
                "'-' only)"
            )
        if match["version"] is not None:
            raise InvalidModelRef(
                f"model {ref!r}: a deployment has no ':version' (it runs its current release); "
                f"use 'deployment:{match['owner']}/{match['name']}'"
            )
        return ModelRef(match["owner"], match["name"], deployment=True)
    match = _MODEL_REF.fullmatch(ref)
    if match is None:
        hint = ""
        if ref.partition(":")[0].lower() == DEPLOYMENT_PREFIX[:-1]:
            hint = f"; a deployment is named with the lower-case prefix {DEPLOYMENT_PREFIX!r}"
        raise InvalidModelRef(
            f"model {ref!r} is not {_FORMS} (letters, digits, '.', '_' and '-' only){hint}"
        )
    return ModelRef(match["owner"], match["name"], match["version"])


def model_base(ref: str) -> str:
    """``ref`` without its version (:attr:`ModelRef.base`). Never raises: text that is no
    reference loses what follows its first ``:``, since run tags are built from rows nobody
    has checked yet."""
    try:
        return parse_model_ref(ref).base
    except InvalidModelRef:
        return str(ref).split(":")[0]
