# `make test` and `make demo` work on a fresh Debian/Ubuntu machine: `deps` installs the system
# packages (as root; otherwise it prints the apt-get command), then the venv is built.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deps test demo fuzz bench lint clean guest-image

# qemu-system-x86, ovmf, postgresql, git, python3-venv, chromium, binutils (scripts/deps.sh says why each).
deps:
	@scripts/deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The real guest for the QEMU tests and the demo: Debian's kernel + firmgate's initramfs, built from
# Debian packages (apt-get download) into ~/.cache/firmgate/guest-image ($FIRMGATE_GUEST_IMAGE).
guest-image: $(STAMP)
	$(BIN)/python -m guest.image build

# Without the guest image (not Debian, no apt) its test skips and says why. With no
# FIRMGATE_TEST_PG_URL, a throwaway PostgreSQL runs for the duration of the tests.
# The last line says what was skipped and why.
test: deps $(STAMP)
	-$(BIN)/python -m guest.image build
	scripts/with-test-postgres.sh $(BIN)/python -m pytest -q -n 2

# Longer fuzzing than `make test` does (FUZZ_SECONDS per target, default 120): atheris, every target.
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[fuzz]'
	PYTHONPATH=. $(BIN)/python -m fuzz.all --seconds $${FUZZ_SECONDS:-120}

demo: deps $(STAMP)
	-$(BIN)/python -m guest.image build
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
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .mypy_cache
