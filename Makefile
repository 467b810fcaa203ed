# Themis Update Manager — the two commands a newcomer needs: `make run`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: command -> package
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium strace:strace \
	bspatch:bsdiff xdelta3:xdelta3 zstd:zstd openssl:openssl

.PHONY: install system-packages run test test-fast lint format bench clean

install: system-packages $(STAMP)

system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing system packages:$$missing — run: sudo apt-get install -y$$missing" >&2; exit 1; \
		fi; \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
			|| { echo "apt-get install failed for:$$missing" >&2; exit 1; }; \
	fi

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11+ is required (found $$($(PYTHON) --version))" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

var/themis.sqlite3: $(STAMP) FORCE
	@mkdir -p var
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py load_demo

run: install var/themis.sqlite3
	$(PY) -m themis_dashboard.devstack

test: install
	$(PY) -m pytest --cov --cov-report=term-missing:skip-covered --cov-report=json:var/coverage.json
	$(PY) tests/coverage_gate.py var/coverage.json

test-fast: install
	$(PY) -m pytest -m "not slow and not browser" -x -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy updates/engine

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	@for b in bench/bench_*.py bench/delta/run.py; do \
		[ -f "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf var/test var/log .pytest_cache .coverage

FORCE:
