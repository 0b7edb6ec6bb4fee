# `make test` and `make demo` work on a fresh machine: they build the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo fuzz bench lint clean
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# Longer fuzzing than `make test` does (FUZZ_SECONDS per target, default 120): atheris, every target.
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[fuzz]'
	PYTHONPATH=. $(BIN)/python -m fuzz.all --seconds $${FUZZ_SECONDS:-120}

demo: $(STAMP)
	$(BIN)/firmgate demo

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# ruff (rules in pyproject.toml) and mypy --strict over every package.
LINT_PATHS := verifier broker host_install guest sim
LINT_STAMP := $(VENV)/.installed-lint
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy --strict $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
