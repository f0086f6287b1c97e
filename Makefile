# Set-up and everyday commands. `make demo` and `make test` work on a fresh Debian machine
# (as root, or with sudo for the apt step): they install what they need themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs only blobfs and its runtime dependencies; tests, linters and
# benchmarks add the test and dev extras (the SDK among them) and the API emulator (its own
# distribution, ./emulator) on top of the same venv.
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
APT_PACKAGES := fuse libfuse2 libfuse3-3 rsync

.PHONY: all system venv test test-fast lint demo bench clean

all: test

system:
	@if ! command -v fusermount >/dev/null 2>&1 || ! ldconfig -p | grep -q "libfuse.so.2" || ! ldconfig -p | grep -q "libfuse3.so.3" || ! command -v rsync >/dev/null 2>&1; then \
		echo "installing $(APT_PACKAGES)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) emulator/pyproject.toml
	$(PY) -m pip install -q -e '.[test,dev]' -e emulator
	touch $(STAMP)

venv: $(STAMP)

test: system venv
	$(PY) -m pytest -q

test-fast: system venv
	$(PY) -m pytest -q -m "not sdk"

lint: venv
	$(VENV)/bin/ruff check blobfs tests bench emulator
	$(VENV)/bin/ruff format --check blobfs bench emulator/sly_emulator emulator/tests
	$(VENV)/bin/mypy blobfs
	$(VENV)/bin/mypy emulator/sly_emulator
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml

demo: system $(RUNTIME)
	PY=$(PY) bash scripts/demo.sh

bench: system venv
	$(PY) -m pip install -q ratarmount
	$(PY) bench/local_scan.py

clean:
	rm -rf $(VENV) demo bench/out .pytest_cache
