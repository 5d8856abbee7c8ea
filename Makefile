# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test check lint typecheck coverage bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/aitbc-coordinator serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# 100% branch coverage of the pure layers (protocol/ and the scheduler core), as house style asks.
PURE := protocol/*,dispatcher/core.py,dispatcher/jobs.py,dispatcher/policy.py,dispatcher/effects.py,dispatcher/stats.py,dispatcher/errors.py,dispatcher/ledger.py
coverage: $(STAMP)
	$(BIN)/python -m coverage run --branch --source=protocol,dispatcher -m pytest -q tests/protocol tests/dispatcher
	$(BIN)/python -m coverage report --include='$(PURE)' --fail-under=100 --skip-covered

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m bench.dispatch --runs 3 --write-docs
	$(BIN)/python -m bench.rest --runs 3 --write-docs

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
