# The few verbs people type. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev demo test lint bench chaos clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/ai-handler dev

demo: $(STAMP)
	$(BIN)/ai-handler demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ai_handler_dagster tests
	$(BIN)/ruff format --check ai_handler_dagster tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/ai-handler bench

# A seeded soak with faults, then the audit: `make chaos SEED=2 CHAOS_ARGS="--count 60"`.
SEED ?= 1
chaos: $(STAMP)
	$(BIN)/ai-handler chaos --seed $(SEED) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache
