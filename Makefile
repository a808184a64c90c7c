# Development entry points (uvloop's Makefile is the model).
#   make serve   create .venv, build the Cython core, start the relay
#   make test    the same environment plus test dependencies and the benchmark
#                peers (nats-server, redis-server); the whole suite
#   make build   rebuild the extension in place after editing core/*.pyx
#   make debug   rebuild with invariant checks (CORE_DEBUG) and cython -a annotations
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test build peers debug annotate clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

build: $(VENV)/.installed
	$(BIN)/python setup.py -q build_ext --inplace

serve: build
	$(BIN)/fenghuo serve $(ARGS)

test: build peers
	$(BIN)/python -m pytest $(ARGS)

peers:
	bash bench/peers/install.sh

debug: $(VENV)/.installed
	FENGHUO_DEBUG=1 $(BIN)/python setup.py -q build_ext --inplace --force

annotate: $(VENV)/.installed
	FENGHUO_ANNOTATE=1 $(BIN)/python setup.py -q build_ext --inplace --force
	@echo "open core/_core.html"

clean:
	rm -rf build core/*.c core/*.so core/*.html bench/*.c bench/*.so *.egg-info
