# Set-up and everyday commands. Everything runs from a project-local virtualenv that
# the first command creates, so a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve run test bench clean

$(BIN)/dspy-trio: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## Serve HTTP, SSE and WebSocket on 127.0.0.1:8000 (simulated LM unless one is configured).
serve: $(BIN)/dspy-trio
	$(BIN)/dspy-trio serve

## Answer one question from the command line.
run: $(BIN)/dspy-trio
	$(BIN)/dspy-trio predict "What is Trio?"

## Lint, type-check and run the whole test suite (installs Chromium, redis-server and haproxy if it can).
test: $(BIN)/dspy-trio
	bash .ci/ensure-chromium
	bash .ci/ensure-redis
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -rs

## Run every benchmark against its peers (installs the bench extra: FastAPI, uvicorn, matplotlib).
bench: $(BIN)/dspy-trio
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks all

clean:
	rm -rf $(VENV)
