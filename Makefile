# Development entry points. Each target creates the virtualenv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install serve test lint typecheck format clean bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/identity-service serve --host $(HOST) --port $(PORT)

test: lint typecheck
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The flow benchmark (bench/README.md). Needs wrk and redis-server; the Express baseline
# runs when npm is there.
bench: install
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	if command -v npm >/dev/null; then npm ci --silent --no-audit --no-fund --prefix bench/express; fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
