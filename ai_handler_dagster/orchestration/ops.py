"""Where the generation ops' values lived before ``generation.py``: kept so that step outputs
pickled then still load.

The S3 pickle IO manager stores each step's output under its class's module path, and a run that
Dagster retries after an upgrade reads the outputs its crashed try wrote: without these names a
retried run fails on its inputs, and the refund path cancels predictions that had already
succeeded. Nothing imports this module; remove it once no run started before the move can be
retried (a run lives at most ``run_monitoring.max_runtime_seconds`` per try).
"""

from ai_handler_dagster.orchestration.generation import AwaitedPrediction, Held

__all__ = ["AwaitedPrediction", "Held"]
