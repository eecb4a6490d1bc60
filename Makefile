# The few verbs people type. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv installs the locked set; its version is the one pinned in pyproject.toml's dev extra.
UV_PIN := $(shell grep -o '"uv==[^"]*"' pyproject.toml | tr -d '"')
UV := $(BIN)/uv
UV_ARGS := --quiet --python $(BIN)/python

.PHONY: install lock dev demo test lint bench chaos clean

# Exactly the packages of requirements.lock (hash-checked), then the project itself, editable.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install --quiet '$(UV_PIN)'
	$(UV) pip sync $(UV_ARGS) --require-hashes requirements.lock
	$(UV) pip install $(UV_ARGS) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Resolve pyproject.toml's dependencies again (newest allowed releases) into requirements.lock.
lock: $(STAMP)
	$(UV) pip compile --quiet pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --no-emit-index-url -o requirements.lock

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
