"""ai_handler_dagster: paid AI generations on Dagster.

Requests are rows in the ``generations`` table. Dagster reserves credits, runs the model on
Replicate, stores the outputs in S3 and settles (or refunds) the credits.
"""

__version__ = "0.1.0"
