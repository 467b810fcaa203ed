"""Reading a release's migrations from its manifest, and the plan's migration lines."""

from __future__ import annotations

from typing import Any

import pytest

from updates.rollouts.schema_steps import (
    MAX_GROUP_LINES,
    ContractGroup,
    MigrationStep,
    contract_versions,
    release_migrations,
    runs_at_least,
    schema_plan,
)

MANIFEST = {
    "migrations": [
        {"version": "0001", "phase": "expand"},
        {"version": "0002", "phase": "contract"},
        {"version": "0003", "phase": "expand"},
    ]
}


def test_migrations_are_read_in_the_manifests_order() -> None:
    assert release_migrations(MANIFEST) == (
        MigrationStep("0001", "expand"),
        MigrationStep("0002", "contract"),
        MigrationStep("0003", "expand"),
    )
    assert contract_versions(MANIFEST) == ("0002",)


@pytest.mark.parametrize(
    "manifest",
    [
        None,
        {},
        {"migrations": "0001"},
        {"migrations": [None, 1, {"version": 1, "phase": "expand"}]},
    ],
)
def test_odd_manifests_list_no_migration(manifest: Any) -> None:
    assert release_migrations(manifest) == ()
    assert contract_versions(manifest) == ()


def test_an_entry_of_an_unknown_phase_is_left_out() -> None:
    odd = {"migrations": [{"version": "0001", "phase": "later"}, {"version": "0002"}]}
    assert release_migrations(odd) == ()


@pytest.mark.parametrize(
    ("installed", "version", "expected"),
    [
        ("1.1.0", "1.1.0", True),
        ("1.2.0", "1.1.0", True),
        ("1.0.9", "1.1.0", False),
        ("", "1.1.0", False),
        ("nightly", "nightly", True),
        ("nightly", "1.1.0", False),
    ],
)
def test_runs_at_least(installed: str, version: str, expected: bool) -> None:
    assert runs_at_least(installed, version) is expected


def test_the_plan_lines_with_delay_texts() -> None:
    groups = [ContractGroup("main", ("a", "b")), ContractGroup(None, ("solo",))]
    lines = [line.text for line in schema_plan(MANIFEST, "1.1.0", groups, contract_delay=7200)]
    assert lines == [
        "expand 0001, 0003 — in each node's update",
        "contract 0002 — after every node of cluster main runs 1.1.0 (+2 h)",
        "contract 0002 — after node solo runs 1.1.0 (+2 h)",
    ]
    odd_delay = schema_plan(MANIFEST, "1.1.0", groups[:1], contract_delay=90)
    assert odd_delay[-1].text.endswith("(+90 s)")
    assert schema_plan({}, "1.1.0", groups) == []


def test_many_groups_are_summed_up_in_one_line() -> None:
    groups = [ContractGroup(f"c{i}", (f"n{i}",)) for i in range(MAX_GROUP_LINES + 3)]
    lines = schema_plan(MANIFEST, "1.1.0", groups)
    assert len(lines) == 1 + MAX_GROUP_LINES + 1
    assert lines[-1].text == "contract 0002 — likewise for 3 more clusters or standalone nodes"
