# `make test` and `make demo` work on a fresh machine: they build the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo fuzz bench lint clean guest-image
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The real guest for the QEMU tests and the demo: Debian's kernel + firmgate's initramfs, built from
# Debian packages (apt-get download) into ~/.cache/firmgate/guest-image ($FIRMGATE_GUEST_IMAGE).
guest-image: $(STAMP)
	$(BIN)/python -m guest.image build

# Without the guest image (not Debian, no apt) its test skips and says why.
test: $(STAMP)
	-$(BIN)/python -m guest.image build
	$(BIN)/python -m pytest -q -n 2

# Longer fuzzing than `make test` does (FUZZ_SECONDS per target, default 120): atheris, every target.
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[fuzz]'
	PYTHONPATH=. $(BIN)/python -m fuzz.all --seconds $${FUZZ_SECONDS:-120}

demo: $(STAMP)
	-$(BIN)/python -m guest.image build
	$(BIN)/firmgate demo

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
