# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run demo test check lint typecheck coverage bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/aitbc-coordinator serve

# The coordinator on a temporary database with simulated miners and a client load (docs/ops.md).
demo: $(STAMP)
	$(BIN)/aitbc-coordinator demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# 100% branch coverage of the pure layers (protocol/ and the scheduler core), as house style asks.
PURE := protocol/*,dispatcher/core.py,dispatcher/receipts.py,dispatcher/jobs.py,dispatcher/policy.py,dispatcher/effects.py,dispatcher/stats.py,dispatcher/errors.py,dispatcher/ledger.py,dispatcher/retention.py
coverage: $(STAMP)
	$(BIN)/python -m coverage run --branch --source=protocol,dispatcher -m pytest -q --hypothesis-profile=coverage tests/protocol tests/dispatcher
	$(BIN)/python -m coverage report --include='$(PURE)' --fail-under=100 --skip-covered

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint typecheck test

# Not part of `make test` nor CI. Needs Debian's redis-server (apt-get install -y redis-server)
# for the Celery peer; each script stops by itself and talks to 127.0.0.1 only.
bench: $(STAMP)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	rm -f bench/results/*.json  # the summary reads this run's results only
	$(BIN)/python -m bench.ceiling --runs 3 --write-docs
	$(BIN)/python -m bench.dispatch --runs 3 --write-docs
	$(BIN)/python -m bench.rest --runs 3 --write-docs
	$(BIN)/python -m bench.sockets --runs 3 --write-docs
	$(BIN)/python -m bench.peers.celery_redis --runs 3 --write-docs
	$(BIN)/python -m bench.summary --write-docs

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
