"""Replicate: create, watch and cancel predictions without losing or doubling money.

Plain Python on the official ``replicate`` client: nothing here imports Dagster, so the provider
logic is used and tested without it (``resources/replicate.py`` is the Dagster resource that
builds a :class:`~ai_handler_dagster.replicate.client.ReplicateClient` from its config).

- ``snapshot``: :class:`PredictionSnapshot`, an immutable view of one prediction, and the error
  a finished one stands for (:func:`snapshot_error`).
- ``failures``: every failure mapped to a ``GenerationError`` (:func:`classify`), the
  problem+json response hook that keeps ``Retry-After``, and redaction of secrets.
- ``client``: the shared HTTP client, ``Cancel-After`` on every create, and
  :class:`ReplicateClient`: create (adopting a lost create's prediction), get, cancel, and the
  provider's list of recent predictions.
- ``waiting``: :func:`wait_many` (one loop for hundreds of predictions, deadlines, cancel at a
  deadline) and :class:`ListSweep` (states from the list instead of one GET each).
"""

# This package is ``ai_handler_dagster.replicate``; imports are absolute (Python 3), so
# ``import replicate`` in its modules is always the official client library, never this package.
