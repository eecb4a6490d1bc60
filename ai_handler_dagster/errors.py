"""Stable error codes shared by every part of the project.

A generation that does not succeed ends with exactly one of these codes, stored on the
``generations`` row and shown to users and operators. The codes are part of the public
contract: never rename one, only add new ones.

========================  =========  ==========================================================
code                      retryable  meaning
========================  =========  ==========================================================
``invalid_input``         no         input rejected by the provider (HTTP 422); names the fields
``invalid_request``       no         the stored request is malformed (a user id, model reference
                                     or input that ``submit`` refuses), found before anything
                                     was held; the message names the field
``unauthorized``          no         the provider rejected the credentials (HTTP 401/403)
``model_not_found``       no         unknown model or version (HTTP 404)
``prediction_failed``     no         the prediction ran and failed (status ``failed``)
``prediction_canceled``   no         prediction canceled by someone else (status ``canceled``)
``deadline_exceeded``     no         prediction ran past its deadline and was canceled by us
``rate_limited``          yes        the provider throttled us (HTTP 429)
``provider_unavailable``  yes        HTTP 5xx, connection errors, timeouts
``insufficient_credits``  no         the user's available credits do not cover the hold
``unpriced_model``        no         no price is configured for the requested model
``output_rejected``       no         output download refused: host not allowed, private address,
                                     too large, or content mismatch
``output_expired``        no         the provider already deleted the output (``data_removed``)
``empty_output``          no         the prediction succeeded with nothing to store (``null``,
                                     ``""``, ``[]``, ``[""]``) for a model that must return
                                     something; nothing is charged
``run_failed``            no         the Dagster run failed, crashed or was canceled before this
                                     generation finished
``canceled_by_request``   no         the application canceled it (``ai-handler cancel``, the
                                     HTTP API's cancel, ``cancel.cancel_generation``)
``internal_error``        no         a bug or an unexpected state in this project
========================  =========  ==========================================================
"""

from __future__ import annotations

from typing import Final

INVALID_INPUT: Final = "invalid_input"
INVALID_REQUEST: Final = "invalid_request"
UNAUTHORIZED: Final = "unauthorized"
MODEL_NOT_FOUND: Final = "model_not_found"
PREDICTION_FAILED: Final = "prediction_failed"
PREDICTION_CANCELED: Final = "prediction_canceled"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"
RATE_LIMITED: Final = "rate_limited"
PROVIDER_UNAVAILABLE: Final = "provider_unavailable"
INSUFFICIENT_CREDITS: Final = "insufficient_credits"
UNPRICED_MODEL: Final = "unpriced_model"
OUTPUT_REJECTED: Final = "output_rejected"
OUTPUT_EXPIRED: Final = "output_expired"
EMPTY_OUTPUT: Final = "empty_output"
RUN_FAILED: Final = "run_failed"
CANCELED_BY_REQUEST: Final = "canceled_by_request"
INTERNAL_ERROR: Final = "internal_error"

#: Every stable code, for validation (e.g. a CHECK constraint or a CLI filter).
ALL_CODES: Final[frozenset[str]] = frozenset(
    {
        INVALID_INPUT,
        INVALID_REQUEST,
        UNAUTHORIZED,
        MODEL_NOT_FOUND,
        PREDICTION_FAILED,
        PREDICTION_CANCELED,
        DEADLINE_EXCEEDED,
        RATE_LIMITED,
        PROVIDER_UNAVAILABLE,
        INSUFFICIENT_CREDITS,
        UNPRICED_MODEL,
        OUTPUT_REJECTED,
        OUTPUT_EXPIRED,
        EMPTY_OUTPUT,
        RUN_FAILED,
        CANCELED_BY_REQUEST,
        INTERNAL_ERROR,
    }
)

#: Codes whose cause is usually transient: retrying the same step later may succeed.
RETRYABLE_CODES: Final[frozenset[str]] = frozenset({RATE_LIMITED, PROVIDER_UNAVAILABLE})


class AiHandlerError(Exception):
    """Base class of every error this project raises on purpose (bad input, a refused
    transition, a provider failure, an unusable setting): the CLI prints these as
    ``error: ...``; anything else is a bug and keeps its traceback."""


class GenerationError(AiHandlerError):
    """A generation step failed with a stable ``code`` and a human-readable ``message``.

    ``retryable`` says whether repeating the same step later may succeed (throttling, outages).
    ``retry_after_s`` optionally carries the provider's ``Retry-After`` hint in seconds.
    Messages must never contain secrets (API tokens, presigned URLs' signatures).
    """

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = False,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return (
            f"GenerationError(code={self.code!r}, message={self.message!r}, "
            f"retryable={self.retryable!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions are pickled across Dagster process boundaries; keep every attribute.
        return (
            _rebuild_generation_error,
            (self.code, self.message, self.retryable, self.retry_after_s),
        )


def _rebuild_generation_error(
    code: str, message: str, retryable: bool, retry_after_s: float | None
) -> GenerationError:
    return GenerationError(code, message, retryable, retry_after_s=retry_after_s)
