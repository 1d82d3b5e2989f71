# Clinic Message Board — one obvious way to run each thing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
PROTO_FILES := $(shell find protos -name '*.proto')
# The browser tests: Debian's chromium driven by Playwright, and axe-core run inside the page.
CHROMIUM := /usr/bin/chromium
AXE := .tools/node_modules/axe-core/axe.min.js
AXE_VERSION := 4.14.1

.PHONY: help venv protos lint run stop status test test-unit bench lock clean buf-breaking chromium

help:
	@echo "make run     set up and start the whole system (prints the URL and demo logins)"
	@echo "make stop    stop everything make run started"
	@echo "make test    set up and run the whole test suite"
	@echo "make lint    buf lint + ruff"
	@echo "make bench   performance benchmarks (not tests)"

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -r requirements.lock
	touch $@

venv: $(VENV)/.installed

clinic/.generated: $(VENV)/.installed $(PROTO_FILES)
	rm -rf clinic
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_FILES)
	find clinic -type d -exec touch {}/__init__.py \;
	touch $@

protos: clinic/.generated

$(BUF):
	@command -v npm >/dev/null || { echo "npm is required for buf (apt-get install npm)"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(AXE):
	@command -v npm >/dev/null || { echo "npm is required for axe-core (apt-get install npm)"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix .tools axe-core@$(AXE_VERSION)

# Installs Debian's chromium when it is missing (as root, or through sudo); never a browser download.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  elif command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "The browser tests need Debian's chromium at $(CHROMIUM). As root run: apt-get update && apt-get install -y chromium"; \
	    exit 1; \
	  fi; \
	fi

lint: protos $(BUF)
	$(BUF) lint
	$(VENV)/bin/ruff check services tests bench

# Compare the contracts with main's (run on a branch).
buf-breaking: $(BUF)
	$(BUF) breaking --against '.git#branch=main'

run: protos
	$(PY) -m services.launcher start

stop:
	@if [ -x $(PY) ]; then $(PY) -m services.launcher stop; else echo "nothing to stop"; fi

status: protos
	$(PY) -m services.launcher status

test: protos $(BUF) $(AXE) chromium
	$(BUF) lint
	$(VENV)/bin/ruff check services tests bench
	$(PY) -m services.launcher ensure-broker
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: protos
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: protos
	$(PY) -m services.launcher ensure-broker
	$(PY) -m bench $(BENCH_ARGS)

lock:
	$(PY) -m pip freeze --exclude-editable | sed '1i # Full pinned dependency tree for pyproject.toml (dev extras included). Regenerate with: make lock' > requirements.lock

clean: stop
	rm -rf clinic .run .run-* .tools $(VENV) artifacts
