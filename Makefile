# Development entry points (uvloop's Makefile is the model).
#   make serve   create .venv with what the relay needs (no test or benchmark
#                packages; SQLite's headers through apt-get when missing,
#                scripts/install_build_deps.sh), build the Cython core once,
#                start the relay
#   make test    the same plus the test extras, the benchmark's load generator
#                (bench/_gen) and the benchmark peers (nats-server,
#                redis-server); the whole suite
#   make cluster 3 nats-servers with JetStream and 3 fenghuo nodes on loopback
#   make build   rebuild the extension (and the generator) in place after
#                editing core/*.pyx; installs the test extras, which have Cython
#   make lint    ruff over the tree and no import cycle in server/
#                (scripts/import_cycles.py); `make typecheck` mypy over server/,
#                fenghuo/, bench/, loadtest/ and scripts/ (scripts/typecheck.sh);
#                both are part of `make test`
#   make debug   rebuild with invariant checks (CORE_DEBUG) and cython -a annotations
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# What the editable install compiles: serving rebuilds when one of them changed.
CORE_SOURCES := $(wildcard core/*.pyx core/*.pxd core/*.pxi core/*.h)

.PHONY: serve test build lint typecheck peers chromium cluster debug annotate clean

# The package and its runtime dependencies; `pip install -e .` compiles the
# core in place (in pip's isolated build environment, so no Cython in .venv).
$(VENV)/.installed: pyproject.toml setup.py $(CORE_SOURCES)
	bash scripts/install_build_deps.sh
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# The package with the test extras, its core compiled once.  The build
# requirements (pyproject.toml [build-system]) go into .venv first and the
# package is installed without build isolation, so .venv's own Cython compiles
# the core and `build_ext --inplace` (make build) then finds it up to date.
# Built in pip's isolated environment instead, the core was compiled a second
# time: .venv's Cython, installed after, has headers newer than that .c (about
# 4 CPU-minutes of every clean `make test`).
BUILD_REQUIRES = $$($(BIN)/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
$(VENV)/.test-installed: pyproject.toml setup.py $(CORE_SOURCES)
	bash scripts/install_build_deps.sh
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q $(BUILD_REQUIRES)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(VENV)/.installed $@

serve: $(VENV)/.installed
	$(BIN)/fenghuo serve $(ARGS)

# The bytecode of every module a relay or a benchmark process imports, written
# once: with PYTHONDONTWRITEBYTECODE set (as on the CI machine) no process
# writes it, and each of the ~850 relays the suite starts (a supervisor and
# two workers by default) compiled the whole server again: 0.07-0.1 s of CPU per
# process, a quarter to a third of a relay's start (bench/results/2026-12-07-cispeed).
# Python reads it whether or not it may write it; a module edited since is
# compiled again here, or in memory by a process that finds it stale.
BYTECODE_DIRS = fenghuo server core bench loadtest scripts
build: $(VENV)/.test-installed
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -m compileall -q $(BYTECODE_DIRS) > /dev/null

test: build lint typecheck peers chromium
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/python scripts/import_cycles.py server

typecheck: $(VENV)/.test-installed
	bash scripts/typecheck.sh

peers:
	bash bench/peers/install.sh

# A local cluster on loopback: 3 nats-servers with JetStream and 3 fenghuo
# nodes on them (scripts/nats_cluster.py; ARGS="--nodes 0" for NATS alone);
# Ctrl-C stops it.
cluster: $(VENV)/.test-installed peers
	$(BIN)/python scripts/nats_cluster.py --nodes 3 $(ARGS)

# Debian's chromium for the browser demo's test (Playwright drives it; it
# downloads no browser of its own).
chromium:
	bash scripts/install_chromium.sh

debug: $(VENV)/.test-installed
	FENGHUO_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force

annotate: $(VENV)/.test-installed
	FENGHUO_ANNOTATE=1 $(BIN)/python setup.py -q build_ext --inplace --force
	@echo "open core/_core.html"

clean:
	rm -rf build core/*.c core/*.so core/*.html bench/*.c bench/*.so *.egg-info
