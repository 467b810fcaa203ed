"""Rolling, canary and blue/green rollouts on a real stack while a seeded injector kills
Redis, coordinators, beat and agents in the middle of applies, and agents drop and
duplicate their messages. After every run: each rollout ended within its deadline, no
node applied a job twice, no cluster had more than max_unavailable nodes drained at
once, the database's versions are what the nodes run, and no job is left active.

Replay a seed: THEMIS_CHAOS_SEED=<seed> [THEMIS_CHAOS_RUNS=<n>] pytest tests/chaos
"""

from __future__ import annotations

import os
import time

import pytest

from tests import procs
from tests.chaos.runner import RUN_BUDGET, RUNS, Chaos

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Faults per run on average, summed over process kills and agent drops/duplicates.
MIN_FAULTS_PER_RUN = 5
# THEMIS_CHAOS_VERBOSE=1: also print every run's outcome and every process fault.
VERBOSE = os.environ.get("THEMIS_CHAOS_VERBOSE") == "1"


@pytest.mark.timeout(420)
def test_rollouts_under_faults_keep_every_invariant(
    chaos: Chaos, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    while chaos.runs_done < RUNS and time.monotonic() - started < RUN_BUDGET:
        chaos.round()
        if all(lane.broken for lane in chaos.lanes):
            break
    with capsys.disabled():
        if VERBOSE:
            print("", *chaos.outcomes, *chaos.fault_log, *chaos.supervisor_log, sep="\n")
        print(f"\n{chaos.summary()}")
    report = "\n".join(
        [
            *map(str, chaos.violations),
            "runs:",
            *chaos.outcomes,
            "faults:",
            *chaos.fault_log,
            *chaos.supervisor_log,
            chaos.stack.log_tail(800),
        ]
    )
    if chaos.violations:
        kept = chaos.stack.keep_logs(procs.ROOT / "var" / "test" / f"chaos-{chaos.seed}")
        report += f"\nlogs and node state kept in {kept}"
    assert not chaos.violations, report
    assert chaos.runs_done >= RUNS, f"only {chaos.runs_done} runs in {RUN_BUDGET:.0f}s"
    assert chaos.faults() >= MIN_FAULTS_PER_RUN * chaos.runs_done, report
