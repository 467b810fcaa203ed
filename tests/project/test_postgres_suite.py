"""The suite again on a real PostgreSQL server (the production database; the suite itself
runs on SQLite, the embedded default): every test that touches the database but the slow
end-to-end ones (real processes, which run against SQLite files), the browser tests and
this one. Migrations
applied to an empty database, the heartbeat batches' raw UPDATE and row locks, the reports'
conditional sequence claims, the coordinator's claims and drives under injected faults, the
outbox, the API's idempotency under racing requests, the events' keyset pages: all on both.
The checks of SQLite's own query plans and settings skip here.

It runs first in its test process (`first` marker, tests/conftest.py), so the other process
takes the rest of the suite meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import postgres
from tests.conftest import DATABASE_TESTS_ONLY

ROOT = Path(__file__).resolve().parents[2]
# What runs on both databases: everything this marker expression selects.
ON_BOTH = "not slow and not browser"


@pytest.mark.slow
@pytest.mark.first
@pytest.mark.timeout(1800)
def test_the_suite_passes_on_postgresql() -> None:
    with postgres.postgres_server() as server:
        env = {
            **os.environ,
            "DATABASE_URL": server.create_database("themis"),
            "THEMIS_TEST_REDIS_PORT": "0",  # a Redis of its own
            DATABASE_TESTS_ONLY: "1",
        }
        env.pop("COV_CORE_SOURCE", None)  # the outer run's coverage is not this run's
        # Not a worker of the outer run: one process of its own.
        env.pop("PYTEST_XDIST_WORKER", None)
        env.pop("PYTEST_XDIST_WORKER_COUNT", None)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cov"]
            + ["-p", "no:xdist", "-rs", "--create-db", "-m", ON_BOTH, "tests"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1740,
            check=False,
        )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"on PostgreSQL: {summary}")
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("SKIPPED")))
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary
