# lipstream: the two set-up commands are `make run` and `make test`; everything else hangs off them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests need: espeak-ng (speech), sox (audio tools), chromium and its
# driver (the call page test), nginx with its RTMP module (the RTMP output tests).
APT_TEST_PACKAGES := espeak-ng sox chromium chromium-driver nginx libnginx-mod-rtmp

.PHONY: run test install test-deps system-test-deps bench clean

# The venv is rebuilt when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

install: $(VENV)/.installed

## make run: create the venv, install, serve the demo avatar with the default engine on :8000
run: install
	$(BIN)/lipstream --config configs/default.yaml serve

# apt packages only when root and only those missing (CI runs as root on a clean machine).
system-test-deps:
	@missing=""; for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi

# The MuseTalk engine is tested on the CPU too, so the tests install the gpu extra. torch is
# pinned and installed first: 2.13.0 is the CPU build this machine kind carries locally; an
# unpinned torch (or one pulled in by diffusers) would fetch several GB of CUDA packages.
TORCH_CPU := torch==2.13.0

# Also after a change of this file (the extras installed here live in it, not in pyproject.toml).
$(VENV)/.test-installed: $(VENV)/.installed Makefile
	$(BIN)/pip install --quiet $(TORCH_CPU)
	$(BIN)/pip install --quiet -e '.[test,gpu,bench]'
	touch $@

test-deps: system-test-deps $(VENV)/.test-installed

## make test: install the test needs (Debian packages too, when root) and run the suite
test: test-deps
	$(BIN)/pytest

## make bench: CPU benchmarks; their figures go to docs/benchmarks.md
bench: install
	$(BIN)/python bench/lite_engine.py --write
	$(BIN)/python bench/rtmp_output.py --write

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
