"""The tests that lean on the database's own guarantees, run again on a real PostgreSQL
server (the production database; the rest of the suite runs on SQLite, the embedded
default): every migration applied to an empty database, the heartbeat batches' raw UPDATE
and row locks, the reports' conditional sequence claims, the coordinator's claims and
drives under injected faults, the outbox and job deadlines, the events' keyset pages and
archive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import postgres

ROOT = Path(__file__).resolve().parents[2]
ON_BOTH = [
    "tests/fleet/test_heartbeat_ingest.py",
    "tests/fleet/test_report_order.py",
    "tests/fleet/test_heartbeats.py",
    "tests/rollouts/test_drive_faults.py",
    "tests/rollouts/test_coordinator.py",
    "tests/jobs/test_outbox.py",
    "tests/jobs/test_deadlines.py",
    "tests/jobs/test_jobs.py",
    "tests/fleet/test_heartbeat_components.py",
    "tests/rollouts/test_coordinator_edges.py",
    "tests/rollouts/test_coordinator_outcomes.py",
    "tests/events",
]


@pytest.mark.slow
def test_the_database_tests_pass_on_postgresql() -> None:
    with postgres.postgres_server() as server:
        env = {
            **os.environ,
            "DATABASE_URL": server.create_database("themis"),
            "THEMIS_TEST_REDIS_PORT": "0",  # a Redis of its own
        }
        env.pop("COV_CORE_SOURCE", None)  # the outer run's coverage is not this run's
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cov"]
            + ["-rs", "--create-db", *ON_BOTH],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
            check=False,
        )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"on PostgreSQL: {summary}")
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("SKIPPED")))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary
