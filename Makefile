# Themis Update Manager — the two commands a newcomer needs: `make run`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages: command -> package
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium strace:strace \
	bspatch:bsdiff xdelta3:xdelta3 zstd:zstd openssl:openssl tar:tar \
	pg_ctlcluster:postgresql softhsm2-util:softhsm2

.PHONY: install lock system-packages run test test-fast lint format bench mutate clean

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

# The stamp is written only after every step succeeded: a failed or interrupted install leaves no
# stamp, so the next run repeats it. A venv whose interpreter or pip is broken is rebuilt.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11+ is required (found $$($(PYTHON) --version))" >&2; exit 1; }
	@rm -f $(STAMP)
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@# The locked pip first: the pip a venv starts with depends on the machine's Python, and an
	@# old one (23.x) resolves an extra (pytest-cov's coverage[toml]) to the registry's newest
	@# release instead of the locked one, which --require-hashes then refuses.
	@sed -n '/^pip==/,/# via/p' requirements.lock > $(VENV)/pip.lock
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r $(VENV)/pip.lock
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Rewrites requirements.lock from pyproject.toml: every package pinned by name, version and hash
# from the package registry. Index and find-links options are not written into the lock, so a
# local wheel folder can never end up in it.
lock:
	@$(PY) -m piptools --version >/dev/null 2>&1 || { \
		test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install -q "pip-tools>=7.4,<8"; }
	$(PY) -m piptools compile -q --extra dev --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host --newline LF \
		-o requirements.lock pyproject.toml

var/themis.sqlite3: $(STAMP) FORCE
	@mkdir -p var
	$(PY) manage.py migrate --noinput -v 0
	$(PY) manage.py load_demo

run: install var/themis.sqlite3
	$(PY) -m themis_dashboard.devstack

# Two test processes (pytest-xdist): most tests wait on real processes, a browser or a
# database, so two share two CPUs well. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: install lint
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=25 --cov --cov-report=term-missing:skip-covered --cov-report=json:var/coverage.json
	$(PY) tests/coverage_gate.py var/coverage.json

test-fast: install
	$(PY) -m pytest -m "not slow and not browser" -x -q

# ruff, the formatter, mypy --strict over the whole project, and the import contracts
# (pyproject.toml [tool.importlinter]): layers point one way, the engine and agent stay
# Django-free, no cycles.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy manage.py themis_dashboard updates tenants workers tests bench
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	@for b in bench/bench_*.py bench/delta/run.py; do \
		[ -f "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done

# Mutation testing (not part of `make test`: it takes a long while): mutmut, configured in
# pyproject.toml [tool.mutmut], mutates the rollout coordinator, plan and gate, the job state
# machine, the tenant scheduler and the node agent, one module and one worker at a time, and
# prints a score per module (equivalent mutants: docs/mutation-equivalents.md). Narrow it with
# MODULES="updates.rollouts.gate tenants.scheduler"; MUTATE_FLAGS="--jobs 2" runs two mutants at
# once, MUTATE_FLAGS=--recheck-survivors runs again only the last run's survivors, --resume
# also the mutants not checked yet (an interrupted run).
mutate: install
	$(PY) tests/mutation_score.py $(MUTATE_FLAGS) $(MODULES)

clean:
	rm -rf var/test var/log var/coverage var/coverage.json .pytest_cache .coverage

FORCE:
