# deltalens — `make test` installs everything a fresh machine lacks, then runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps up demo test bench reliability clean

install: system-deps $(STAMP) frontend/dist/index.html

# system packages: gcc builds the C kernel; redis-server is started by the service tests;
# docker-compose validates docker-compose.yml (no Docker engine is needed for that);
# chromium runs the dashboard tests (driven by Playwright; never `playwright install`)
APT_PACKAGES := gcc redis-server docker-compose chromium
system-deps:
	@missing=""; for c in $(APT_PACKAGES); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to 2.13.0 (constraints.txt) for local and CI installs: the CPU build on this disk
$(STAMP): pyproject.toml constraints.txt worker/_fastpair.c | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# the API and a worker on this machine, no Docker, no Redis: http://127.0.0.1:8000/
up: install
	$(BIN)/deltalens up --port $${PORT:-8000} --data-dir $${DATA_DIR:-deltalens-data}

# the showcase: train the tiny demo models once (CPU, minutes), then serve them with their analyses
demo: install
	@test -f demo-data/log.json || $(BIN)/deltalens demo-data demo-data
	$(BIN)/deltalens up --port $${PORT:-8000} --data-dir $${DATA_DIR:-deltalens-data} --demo demo-data

# the dashboard: npm packages from the lock file, then the static build the API serves
frontend/node_modules/.installed: frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund
	touch $@

frontend/dist/index.html: frontend/node_modules/.installed frontend/index.html frontend/vite.config.ts $(wildcard frontend/src/*.ts frontend/src/*/*.ts frontend/src/*.css)
	cd frontend && npm run build

test: install
	cd frontend && npx vitest run
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# the long fault, fuzz and load runs behind docs/reliability.md (~25 min); figures in test-output/reliability/
reliability: install
	DELTALENS_SOAK=1 $(BIN)/python -m pytest -q tests/test_soak.py
	DELTALENS_HEADER_FUZZ_EXAMPLES=100000 $(BIN)/python -m pytest -q tests/test_header_fuzz.py
	DELTALENS_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest -q tests/test_api_fuzz.py
	$(BIN)/python -m pytest -q tests/test_hostile.py tests/test_access.py tests/test_faults.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/reliability_report.py

bench: install
	$(BIN)/python bench/pair.py
	$(BIN)/python bench/upload.py

clean:
	rm -rf $(VENV) build *.egg-info worker/*.so .pytest_cache .hypothesis frontend/node_modules frontend/dist
