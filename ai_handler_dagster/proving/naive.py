"""The naive design, as a code location of its own: the project's definitions with the
generation job on Dagster's default executor (a process per op). ``ai-handler bench --naive``
loads it, with one generation per run and runs started as fresh interpreters, to measure what
the design replaces. Nothing in production loads it."""

from dagster import multiprocess_executor

from ai_handler_dagster.definitions import build_definitions

defs = build_definitions(multiprocess_executor)
