"""pytest plugin for `make mutate`: a mutant is judged by the fast tests of its own module.

mutmut runs, for each mutant, every selected test that called the mutated function. For a
function every drive or every schedule passes through, that is most of the suite, run again
for each of hundreds of mutants. This plugin, loaded only by mutmut
(`[tool.mutmut] pytest_add_cli_args`: `-p tests.mutation_select`), keeps of those tests the
ones that exercise the mutant's module directly; the other runs mutmut makes (collecting
stats, the clean run, the forced failure) are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Mutated module -> the test files (node id prefixes) that judge its mutants.
TESTS_BY_MODULE: dict[str, tuple[str, ...]] = {
    "updates.rollouts.gate": (
        "tests/rollouts/test_gate.py",
        "tests/rollouts/test_coordinator.py",
    ),
    "updates.rollouts.plan": (
        "tests/rollouts/test_plan.py",
        "tests/rollouts/test_coordinator.py",
    ),
    "tenants.scheduler": (
        "tests/tenants/test_scheduler.py",
        "tests/tenants/test_scheduler_properties.py",
        "tests/tenants/test_scheduler_rules.py",
    ),
    "updates.jobs.services": (
        "tests/jobs/",
        "tests/rollouts/test_coordinator.py",
    ),
    "updates.rollouts.coordinator": (
        "tests/rollouts/test_coordinator.py",
        "tests/rollouts/test_coordinator_rules.py",
        "tests/rollouts/test_coordinator_edges.py",
        "tests/rollouts/test_coordinator_outcomes.py",
        "tests/rollouts/test_contract_step.py",
        "tests/rollouts/test_drive_faults.py",
        "tests/rollouts/test_tenant_rollback.py",
        # A node without an update plan: the refusal's event, decision and failure.
        "tests/rollouts/test_plan_refusals.py",
    ),
    "workers.ledger": ("tests/agent/test_ledger.py", "tests/agent/test_agent_jobs.py"),
    "workers.agent": (
        "tests/agent/test_agent_unit.py",
        "tests/agent/test_agent_jobs.py",
        "tests/agent/test_agent_busy.py",
        "tests/agent/test_agent_damage.py",
        "tests/agent/test_agent_contract.py",
        "tests/agent/test_agent_retention.py",
        "tests/agent/test_agent_downloads.py",
        "tests/agent/test_agent_plan.py",
        "tests/agent/test_agent_parts.py",
    ),
}


def tests_for(mutant: str) -> tuple[str, ...] | None:
    """The test files for a mutant name (`tenants.scheduler.x_zone__mutmut_3`); None when
    this is not a mutant's run or its module is not listed (then nothing is deselected)."""
    if "__mutmut_" not in mutant:
        return None
    module = mutant.split(".x_")[0].split(".xǁ")[0]
    return TESTS_BY_MODULE.get(module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = tests_for(os.environ.get("MUTANT_UNDER_TEST", ""))
    if wanted is None:
        return
    # THEMIS_MUTATE_ONLY (comma-separated test paths) narrows further, to re-judge the
    # survivors of a run quickly with the tests just written: a mutant killed by fewer tests
    # is killed by all of them, so only a survivor's verdict can be too pessimistic.
    only = tuple(p for p in os.environ.get("THEMIS_MUTATE_ONLY", "").split(",") if p) or ("",)
    keep = [i for i in items if i.nodeid.startswith(wanted) and i.nodeid.startswith(only)]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    # Fastest first (mutmut stops at the first failure): a killed mutant is killed as
    # surely, and sooner; only a survivor still runs them all.
    took = _durations()
    items[:] = sorted(keep, key=lambda item: took.get(item.nodeid, UNKNOWN_DURATION))


# A test mutmut has no time for yet (written since its stats) runs after the known ones.
UNKNOWN_DURATION = 60.0


def _durations() -> dict[str, float]:
    """Each test's time as mutmut's stats recorded it (run from the mutants folder)."""
    for path in (Path("mutmut-stats.json"), Path("mutants") / "mutmut-stats.json"):
        if path.exists():
            try:
                found: dict[str, float] = json.loads(path.read_text())["duration_by_test"]
            except (OSError, ValueError, KeyError):
                return {}
            return found
    return {}
