"""How this project runs Dagster: the run launcher, the daemon entry point and what the refund
paths need to know of Dagster's run retries.

The only package that imports Dagster's private modules (``dagster._core``, ``dagster._daemon``):
everything else uses public ``dagster`` names, so a Dagster upgrade that moves an internal
breaks here and nowhere else.
"""
