# Development entry points. Each target creates the virtualenv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install serve demo demo-node test chaos topology lint typecheck format clean bench js node-sdk

# The service with its dev tools, then the Python SDK (clients/python, its own distribution),
# which `make test` tests too.
$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check -e "clients/python[aiohttp]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/identity-service serve --host $(HOST) --port $(PORT)

# The two-site checkout demo (examples/checkout/README.md): shop, checkouts, the service and a
# collector on 127.0.0.1 ports 8101-8106 (DEMO_BASE_PORT=8100); Ctrl-C stops all. With Node 20+
# and npm, the Node checkout (examples/checkout/node) is built and runs too.
DEMO_BASE_PORT ?= 8100
demo: install demo-node
	$(BIN)/python -m examples.checkout --base-port $(DEMO_BASE_PORT)

# Node 20+ and npm are here.
NODE_OK = command -v npm >/dev/null && node -e 'process.exit(parseInt(process.versions.node) < 20 ? 1 : 0)'

clients/node/dist/esm/index.js: clients/node/package-lock.json $(wildcard clients/node/src/*.ts)
	if $(NODE_OK); then \
	  cd clients/node && npm ci --silent --no-audit --no-fund && npm run --silent build; fi

# The demo's Node checkout: the Node SDK built, then the checkout's packages (express, and the
# SDK linked from clients/node). Without Node 20+ and npm, the demo runs without it.
demo-node: examples/checkout/node/node_modules/.package-lock.json

examples/checkout/node/node_modules/.package-lock.json: examples/checkout/node/package-lock.json clients/node/dist/esm/index.js
	if $(NODE_OK); then npm ci --silent --no-audit --no-fund --prefix examples/checkout/node; \
	else echo "demo-node: Node 20+ and npm not found, the demo runs without its Node checkout"; fi

# The whole suite: lint, types, the tests, then the chaos and topology suites as steps of
# their own.
test: lint typecheck js node-sdk demo-node
	$(BIN)/pytest
	$(MAKE) --no-print-directory chaos
	$(MAKE) --no-print-directory topology

# Redis, the service and the events collector killed under load (tests/test_chaos.py):
# about 2 minutes, with each scenario's figures printed.
chaos: install
	$(BIN)/pytest -m chaos -s tests/test_chaos.py

# The service on real Redis topologies (tests/redis_topologies.py): a 3-master Cluster (the
# store contract, the race, delivery and the sealing scan, a resharding under load) and a
# master with a replica behind three sentinels (the contract, two failovers under load,
# with and without IDENTITY_REDIS_WAIT): about 2 minutes, the figures printed.
topology: install
	$(BIN)/pytest -m topology -s -p no:randomly

# AMP's own cache-URL package, which tests/test_amp_caches.py runs (tests/js). Without npm the
# test skips, except in CI, where .ci/run installs Node 20+ and npm first (.ci/ensure-node).
js: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	if command -v npm >/dev/null; then npm ci --silent --no-audit --no-fund --prefix tests/js; fi

# The Node SDK (clients/node, docs/sdk-node.md): install its dev tools, build the ESM and
# CommonJS outputs, then run its tests (node --test) against this checkout's service. Skipped
# without Node 20+ and npm (Debian 12's Node is 18), except in CI, where .ci/run installs them
# first (.ci/ensure-node) and their absence fails.
node-sdk: install
	if $(NODE_OK); then \
	  cd clients/node && npm ci --silent --no-audit --no-fund && npm run --silent build \
	  && IDENTITY_SERVICE_BIN="$(abspath $(BIN))/identity-service" npm test --silent; \
	elif [ -n "$$CI" ]; then echo "node-sdk: CI needs Node 20+ and npm (.ci/ensure-node)" >&2; exit 1; \
	else echo "node-sdk: Node 20+ and npm not found, the Node SDK is not built nor tested"; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The flow benchmark (bench/README.md). Needs wrk and redis-server; the Node peers (Fastify,
# Express) run when npm is there.
bench: install
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	if command -v npm >/dev/null; then \
	  npm ci --silent --no-audit --no-fund --prefix bench/fastify \
	  && npm ci --silent --no-audit --no-fund --prefix bench/express; fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info artifacts
