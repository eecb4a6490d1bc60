"""The proving tools: ``ai-handler bench`` (throughput through the real Dagster path) and
``ai-handler chaos`` (a seeded soak under faults, then an independent audit).

Both run the embedded stack of :mod:`ai_handler_dagster.devstack` as production runs it;
:class:`~ai_handler_dagster.proving.stack.ProvingStack` adds what only they need: the stack's pids
and the process faults they inject.
"""
