# deltalens — `make test` installs everything a fresh machine lacks, then runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run-deps test-deps up demo test lint bench reliability clean

install: $(STAMP)

# Debian packages, installed only by the commands that need them (as root with apt; otherwise one
# line names what is missing). `make up`/`make demo` need a C compiler (the one-pass kernel);
# `make test` also starts redis-server, validates docker-compose.yml with docker-compose and drives
# chromium with Playwright (never `playwright install`).
RUN_PACKAGES  := gcc
TEST_PACKAGES := gcc redis-server docker-compose chromium
define need
	@missing=""; for c in $(1); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing — install with: sudo apt-get install$$missing (or your system's package manager)"; exit 1; fi; \
	fi
endef

run-deps:
	$(call need,$(RUN_PACKAGES))

test-deps:
	$(call need,$(TEST_PACKAGES))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to 2.13.0 (constraints.txt) for local and CI installs: the CPU build on this disk
$(STAMP): pyproject.toml constraints.txt worker/_fastpair.c worker/_fastmask.c worker/_lanes.h | run-deps $(BIN)/python backend/dashboard/index.html
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# the API and a worker on this machine, no Docker, no Redis: http://127.0.0.1:8000/
up: install
	$(BIN)/deltalens up --port $${PORT:-8000} --data-dir $${DATA_DIR:-deltalens-data}

# the showcase: serves at once; the tiny demo models train meanwhile (CPU, minutes, the first time only;
# a banner shows the stages) and each analysis is queued as soon as its checkpoints exist
demo: install
	$(BIN)/deltalens up --port $${PORT:-8000} --data-dir $${DATA_DIR:-deltalens-data} --demo demo-data

# the dashboard: npm packages from the lock file, then the static build the API serves
frontend/node_modules/.installed: frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund
	touch $@

backend/dashboard/index.html: frontend/node_modules/.installed frontend/index.html frontend/vite.config.ts $(wildcard frontend/src/*.ts frontend/src/*/*.ts frontend/src/*.css)
	cd frontend && npm run build

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd frontend && npx prettier --check src test

test: test-deps install lint
	cd frontend && npx vitest run
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# the long fault, fuzz and load runs behind docs/reliability.md (~25 min); figures in test-output/reliability/
reliability: install
	DELTALENS_RELIABILITY=1 DELTALENS_SOAK=1 $(BIN)/python -m pytest -q tests/test_soak.py
	DELTALENS_HEADER_FUZZ_EXAMPLES=100000 $(BIN)/python -m pytest -q tests/test_header_fuzz.py
	DELTALENS_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest -q tests/test_api_fuzz.py
	DELTALENS_RELIABILITY=1 $(BIN)/python -m pytest -q tests/test_hostile.py tests/test_access.py tests/test_faults.py
	DELTALENS_WHEEL_DEPS=1 $(BIN)/python -m pytest -q tests/test_wheel.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/reliability_report.py

bench: install
	$(BIN)/python bench/pair.py
	$(BIN)/python bench/upload.py

clean:
	rm -rf $(VENV) build dist *.egg-info worker/*.so .pytest_cache .hypothesis frontend/node_modules backend/dashboard
