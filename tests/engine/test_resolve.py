"""The dependency resolver: the plan it makes, and the words it fails with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import product as product_of

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from updates.engine import resolve as resolve_module
from updates.engine.manifest import Dependency
from updates.engine.resolve import (
    Candidate,
    DependencyCycle,
    PlanStep,
    ResolutionFailed,
    UpdatePlan,
    installed_conflicts,
    resolve,
)

Catalogue = dict[str, list[Candidate]]


def releases(product: str, *versions: str, needs: tuple[Dependency, ...] = ()) -> list[Candidate]:
    return [Candidate(product, v, needs, f"{product}@{v}") for v in versions]


def release(product: str, version: str, *needs: Dependency) -> Candidate:
    return Candidate(product, version, needs, f"{product}@{version}")


def catalogue(*candidates: Candidate | list[Candidate]) -> Catalogue:
    found: Catalogue = {}
    for item in candidates:
        for candidate in item if isinstance(item, list) else [item]:
            found.setdefault(candidate.product, []).append(candidate)
    return found


def steps(plan: UpdatePlan) -> list[tuple[str, str, str | None]]:
    return [(s.product, s.version, s.from_version) for s in plan.steps]


def explanation(
    target: str, version: str | None, installed: Mapping[str, str], available: Catalogue
) -> str:
    with pytest.raises(ResolutionFailed) as raised:
        resolve(target, version, installed, available)
    assert str(raised.value) == raised.value.explanation
    return raised.value.explanation


STORAGE = releases("themis-storage", "1.3.0", "1.4.0", "1.4.2", "2.0.0")
SERVER_15 = release(
    "themisdb",
    "1.5.0",
    Dependency("themis-storage", ">=1.4.0,<2.0.0"),
    Dependency("themis-query", ">=1.4.5"),
)


def test_backfills_missing_dependencies_at_their_newest_fitting_release() -> None:
    available = catalogue(
        releases("themisdb", "1.4.0"),
        SERVER_15,
        STORAGE,
        releases("themis-query", "1.4.4", "1.4.5", "1.5.1"),
    )
    plan = resolve("themisdb", None, {"themisdb": "1.4.0"}, available)
    assert steps(plan) == [
        ("themis-query", "1.5.1", None),
        ("themis-storage", "1.4.2", None),  # 2.0.0 is newer but outside <2.0.0
        ("themisdb", "1.5.0", "1.4.0"),
    ]
    assert plan.steps[0] == PlanStep("themis-query", "1.5.1", None, "themis-query@1.5.1")


def test_newest_target_release_is_chosen_without_a_version() -> None:
    available = catalogue(releases("themisdb", "1.4.0", "1.10.0", "1.9.0"))
    assert steps(resolve("themisdb", None, {}, available)) == [("themisdb", "1.10.0", None)]


def test_a_named_version_is_taken_even_when_newer_exist() -> None:
    available = catalogue(releases("themisdb", "1.4.0", "1.5.0", "1.6.0"))
    plan = resolve("themisdb", "1.5.0", {"themisdb": "1.4.0"}, available)
    assert steps(plan) == [("themisdb", "1.5.0", "1.4.0")]


def test_installed_dependency_meeting_the_minimum_stays() -> None:
    available = catalogue(SERVER_15, STORAGE, releases("themis-query", "1.4.5", "1.6.0"))
    installed = {"themis-storage": "1.4.0", "themis-query": "1.4.5"}
    plan = resolve("themisdb", "1.5.0", installed, available)
    assert steps(plan) == [("themisdb", "1.5.0", None)]


def test_installed_dependency_below_the_minimum_is_upgraded_to_the_newest_fitting() -> None:
    available = catalogue(SERVER_15, STORAGE, releases("themis-query", "1.4.5"))
    installed = {"themis-storage": "1.3.0", "themis-query": "1.4.5"}
    plan = resolve("themisdb", "1.5.0", installed, available)
    assert steps(plan) == [("themis-storage", "1.4.2", "1.3.0"), ("themisdb", "1.5.0", None)]


def test_installed_components_nothing_touches_stay_out_of_the_plan() -> None:
    available = catalogue(releases("themisdb", "1.0", "2.0"), releases("themis-geo", "1.0", "3.0"))
    plan = resolve("themisdb", None, {"themisdb": "1.0", "themis-geo": "1.0"}, available)
    assert steps(plan) == [("themisdb", "2.0", "1.0")]


def test_order_is_topological_dependencies_first() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-query", ">=1")),
        release("themis-query", "1.0", Dependency("themis-storage", ">=1")),
        release("themis-storage", "1.0", Dependency("themis-codec", ">=1")),
        release("themis-codec", "1.0"),
        release("themis-audit", "1.0"),
    )
    available["themisdb"][0] = release(
        "themisdb", "2.0", Dependency("themis-query", ">=1"), Dependency("themis-audit")
    )
    plan = resolve("themisdb", None, {}, available)
    products = [s.product for s in plan.steps]
    assert products[-1] == "themisdb"
    assert products.index("themis-codec") < products.index("themis-storage")
    assert products.index("themis-storage") < products.index("themis-query")
    assert sorted(products) == sorted(available)


def test_the_target_goes_before_what_in_the_plan_depends_on_it() -> None:
    # The server conflicts with the old plugin; the plugin's new release needs the new server.
    available = catalogue(
        releases("themisdb", "1.0"),
        release("themisdb", "2.0", Dependency("themis-geo", "<2", conflicts=True)),
        releases("themis-geo", "1.0"),
        release("themis-geo", "2.0", Dependency("themisdb", ">=2")),
    )
    plan = resolve("themisdb", "2.0", {"themisdb": "1.0", "themis-geo": "1.0"}, available)
    assert steps(plan) == [("themisdb", "2.0", "1.0"), ("themis-geo", "2.0", "1.0")]


def test_a_cycle_is_refused_naming_it() -> None:
    available = catalogue(
        release("themis-a", "1.0", Dependency("themis-b")),
        release("themis-b", "2.0", Dependency("themis-c")),
        release("themis-c", "1.1", Dependency("themis-a")),
    )
    with pytest.raises(DependencyCycle) as raised:
        resolve("themis-a", None, {}, available)
    assert raised.value.cycle == ("themis-a 1.0", "themis-b 2.0", "themis-c 1.1", "themis-a")
    assert "themis-a 1.0 -> themis-b 2.0 -> themis-c 1.1 -> themis-a" in raised.value.explanation


def test_a_cycle_among_components_that_stay_needs_no_order() -> None:
    available = catalogue(
        release("themis-a", "1.0", Dependency("themis-b")),
        release("themis-b", "2.0", Dependency("themis-a")),
        releases("themisdb", "1.0", "2.0"),
    )
    installed = {"themis-a": "1.0", "themis-b": "2.0", "themisdb": "1.0"}
    assert steps(resolve("themisdb", None, installed, available)) == [("themisdb", "2.0", "1.0")]


def test_a_component_needing_a_cycle_that_stays_is_still_planned() -> None:
    available = catalogue(
        release("themis-a", "1.0", Dependency("themis-b")),
        release("themis-b", "2.0", Dependency("themis-a")),
        releases("themisdb", "1.0"),
        release("themisdb", "2.0", Dependency("themis-a"), Dependency("themis-new")),
        release("themis-new", "1.0", Dependency("themis-b")),
    )
    installed = {"themis-a": "1.0", "themis-b": "2.0", "themisdb": "1.0"}
    assert steps(resolve("themisdb", None, installed, available)) == [
        ("themis-new", "1.0", None),
        ("themisdb", "2.0", "1.0"),
    ]


def test_a_search_that_runs_too_long_gives_up_naming_its_worst_clash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resolve_module, "MAX_ROUNDS", 4)
    available = catalogue(
        releases(
            "themisdb",
            "1.0",
            "2.0",
            "3.0",
            needs=(Dependency("themis-mid"), Dependency("themis-deep", ">=2")),
        ),
        releases("themis-mid", "1.0", "1.1", "1.2", needs=(Dependency("themis-deep", "<2"),)),
        releases("themis-deep", "1.0", "2.0"),
    )
    text = explanation("themisdb", None, {}, available)
    assert text.startswith("no combination of releases was found for themisdb within 4 steps")
    assert "The clash met most often: themisdb 3.0 needs themis-deep >=2, but" in text


def test_a_clash_is_explained_with_its_chain() -> None:
    available = catalogue(
        SERVER_15,
        STORAGE,
        release("themis-query", "1.4.5", Dependency("themis-storage", "<1.4")),
    )
    assert explanation("themisdb", "1.5.0", {}, available) == (
        "themisdb 1.5.0 needs themis-storage >=1.4.0,<2.0.0, but themis-query 1.4.5"
        " (needed by themisdb 1.5.0) needs themis-storage <1.4; no release of"
        " themis-storage satisfies both (releases: 2.0.0, 1.4.2, 1.4.0, 1.3.0)"
    )


def test_releases_of_one_component_saying_the_same_are_named_together() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-mid"), Dependency("themis-deep", ">=2")),
        releases("themis-mid", "1.0", "1.1", "1.2", needs=(Dependency("themis-deep", "<2"),)),
        releases("themis-deep", "1.0", "2.0"),
    )
    text = explanation("themisdb", None, {}, available)
    assert "themis-mid 1.2 (needed by themisdb 2.0) and 2 other releases of themis-mid" in text
    assert "need themis-deep <2" in text and "themisdb 2.0 needs themis-deep >=2" in text


def test_the_chain_names_who_brought_each_release_in() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-a"), Dependency("themis-deep", ">=2")),
        release("themis-a", "1.0", Dependency("themis-b")),
        release("themis-b", "1.0", Dependency("themis-deep", "<2")),
        releases("themis-deep", "1.0", "2.0"),
    )
    text = explanation("themisdb", "2.0", {}, available)
    assert (
        "themis-b 1.0 (needed by themis-a 1.0, needed by themisdb 2.0) needs themis-deep <2" in text
    )


def test_an_installed_release_in_the_chain_is_marked() -> None:
    available = catalogue(
        SERVER_15,
        STORAGE,
        release("themis-query", "1.4.5", Dependency("themis-storage", "<1.4")),
    )
    text = explanation("themisdb", "1.5.0", {"themis-query": "1.4.5"}, available)
    assert "themis-query 1.4.5 (installed) needs themis-storage <1.4" in text


def test_a_clash_with_what_is_installed_names_the_installed_release() -> None:
    available = catalogue(SERVER_15, STORAGE, releases("themis-query", "1.4.5"))
    installed = {"themis-storage": "2.0.0"}
    text = explanation("themisdb", "1.5.0", installed, available)
    assert text.startswith("themisdb 1.5.0 needs themis-storage >=1.4.0,<2.0.0, but")
    assert (
        "themis-storage 2.0.0 is installed (kept or upgraded, never removed or downgraded)" in text
    )


def test_an_installed_component_is_never_downgraded_for_a_dependency() -> None:
    available = catalogue(release("themisdb", "1.5.0", Dependency("themis-storage", "<2")), STORAGE)
    with pytest.raises(ResolutionFailed):
        resolve("themisdb", None, {"themis-storage": "2.0.0"}, available)


def test_the_target_is_not_downgraded_without_a_version_but_is_with_one() -> None:
    available = catalogue(releases("themisdb", "1.0", "2.0"))
    assert steps(resolve("themisdb", None, {"themisdb": "3.0"}, available)) == []
    assert steps(resolve("themisdb", "1.0", {"themisdb": "2.0"}, available)) == [
        ("themisdb", "1.0", "2.0")
    ]


def test_an_older_target_is_taken_when_the_newest_cannot_fit() -> None:
    available = catalogue(
        releases("themisdb", "1.4.0", "1.4.9"),
        release("themisdb", "1.5.0", Dependency("themis-storage", "<2")),
        STORAGE,
    )
    plan = resolve("themisdb", None, {"themisdb": "1.4.0", "themis-storage": "2.0.0"}, available)
    assert steps(plan) == [("themisdb", "1.4.9", "1.4.0")]


def test_installed_components_own_dependencies_count() -> None:
    # The installed query release needs old storage; the target needs new storage:
    # the query component moves to a release that accepts it.
    available = catalogue(
        SERVER_15,
        STORAGE,
        release("themis-query", "1.4.5", Dependency("themis-storage", "<1.4")),
        release("themis-query", "1.4.6", Dependency("themis-storage", ">=1.4")),
    )
    installed = {"themis-query": "1.4.5", "themis-storage": "1.3.0"}
    plan = resolve("themisdb", "1.5.0", installed, available)
    assert steps(plan) == [
        ("themis-storage", "1.4.2", "1.3.0"),
        ("themis-query", "1.4.6", "1.4.5"),
        ("themisdb", "1.5.0", None),
    ]


def test_optional_dependency_not_installed_is_left_alone() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-geo", ">=2", optional=True)),
        releases("themis-geo", "1.0", "2.0"),
    )
    assert steps(resolve("themisdb", None, {}, available)) == [("themisdb", "2.0", None)]


def test_optional_dependency_installed_is_upgraded_to_satisfy() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-geo", ">=2,<3", optional=True)),
        releases("themis-geo", "1.0", "2.0", "2.5", "3.0"),
    )
    plan = resolve("themisdb", None, {"themis-geo": "1.0"}, available)
    assert steps(plan) == [("themis-geo", "2.5", "1.0"), ("themisdb", "2.0", None)]


def test_optional_dependency_installed_that_cannot_satisfy_is_explained() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-geo", ">=2", optional=True)),
        releases("themis-geo", "1.0"),
    )
    text = explanation("themisdb", "2.0", {"themis-geo": "1.0"}, available)
    assert "themisdb 2.0 needs themis-geo >=2 when it is installed" in text
    assert "themis-geo 1.0 is installed" in text


def test_conflicting_component_not_installed_stays_out() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-legacy", conflicts=True)),
        releases("themis-legacy", "1.0"),
    )
    assert steps(resolve("themisdb", None, {}, available)) == [("themisdb", "2.0", None)]


def test_conflicting_installed_component_is_upgraded_out_of_the_range() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-legacy", "<3", conflicts=True)),
        releases("themis-legacy", "1.0", "3.1"),
    )
    plan = resolve("themisdb", None, {"themis-legacy": "1.0"}, available)
    assert steps(plan) == [("themis-legacy", "3.1", "1.0"), ("themisdb", "2.0", None)]


def test_conflict_with_an_installed_component_that_cannot_move_is_explained() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-legacy", conflicts=True)),
        releases("themis-legacy", "1.0"),
    )
    text = explanation("themisdb", "2.0", {"themis-legacy": "1.0"}, available)
    assert text.startswith("themisdb 2.0 conflicts with any themis-legacy, but themis-legacy 1.0")


def test_an_installed_release_conflicting_with_the_new_target_must_move() -> None:
    available = catalogue(
        releases("themisdb", "1.0", "2.0"),
        release("themis-geo", "1.0", Dependency("themisdb", ">=2", conflicts=True)),
        releases("themis-geo", "1.1"),
    )
    plan = resolve("themisdb", None, {"themisdb": "1.0", "themis-geo": "1.0"}, available)
    assert set(steps(plan)) == {("themisdb", "2.0", "1.0"), ("themis-geo", "1.1", "1.0")}


def test_a_required_and_a_conflicting_need_for_the_same_component_are_explained() -> None:
    available = catalogue(
        release(
            "themisdb",
            "2.0",
            Dependency("themis-query"),
            Dependency("themis-legacy", conflicts=True),
        ),
        release("themis-query", "1.0", Dependency("themis-legacy", ">=1")),
        releases("themis-legacy", "1.0"),
    )
    text = explanation("themisdb", None, {}, available)
    assert "themis-query 1.0 (needed by themisdb 2.0) needs themis-legacy >=1" in text
    assert "themisdb 2.0 conflicts with any themis-legacy" in text
    assert text.endswith("no release of themis-legacy satisfies both (releases: 1.0)")


def test_unknown_target_and_unknown_version_are_named() -> None:
    available = catalogue(releases("themisdb", "1.0", "2.0"))
    assert explanation("themis-nope", None, {}, available) == "no release of themis-nope is known"
    assert explanation("themisdb", "9.9", {}, available) == (
        "themisdb 9.9 is not a known release (releases: 2.0, 1.0)"
    )


def test_a_dependency_nobody_released_is_named() -> None:
    available = catalogue(release("themisdb", "2.0", Dependency("themis-ghost", ">=1")))
    assert explanation("themisdb", None, {}, available) == (
        "themisdb 2.0 needs themis-ghost >=1, but themis-ghost has no release"
    )


def test_no_release_in_range_is_named_with_the_releases() -> None:
    available = catalogue(release("themisdb", "2.0", Dependency("themis-storage", ">=3")), STORAGE)
    assert explanation("themisdb", None, {}, available) == (
        "themisdb 2.0 needs themis-storage >=3, but no release of themis-storage satisfies it"
        " (releases: 2.0.0, 1.4.2, 1.4.0, 1.3.0)"
    )


def test_prereleases_only_when_named() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-storage", ">=1")),
        releases("themis-storage", "1.0", "2.0rc1"),
        releases("themis-query", "1.0", "1.1b2"),
    )
    assert steps(resolve("themisdb", None, {}, available)) == [
        ("themis-storage", "1.0", None),
        ("themisdb", "2.0", None),
    ]
    assert steps(resolve("themis-query", None, {}, available)) == [("themis-query", "1.0", None)]
    assert steps(resolve("themis-query", "1.1b2", {}, available)) == [
        ("themis-query", "1.1b2", None)
    ]


def test_an_installed_release_the_dashboard_does_not_know_stays() -> None:
    available = catalogue(release("themisdb", "2.0", Dependency("themis-storage", ">=1")))
    plan = resolve("themisdb", None, {"themis-storage": "1.7.3"}, available)
    assert steps(plan) == [("themisdb", "2.0", None)]


def test_an_installed_local_build_stays_and_satisfies() -> None:
    available = catalogue(
        release("themisdb", "2.0", Dependency("themis-storage", ">=1.4")), STORAGE
    )
    plan = resolve("themisdb", None, {"themis-storage": "1.4.0+build7"}, available)
    assert steps(plan) == [("themisdb", "2.0", None)]


def test_a_release_declaring_a_broken_constraint_is_named() -> None:
    broken = Dependency("themis-storage", ">>1")  # as a hand-edited stored row might hold
    available = catalogue(release("themisdb", "2.0", broken), STORAGE)
    assert explanation("themisdb", None, {}, available) == (
        "themisdb 2.0 declares themis-storage '>>1', which is not a PEP 440 specifier"
    )


def test_an_installed_version_that_is_not_a_version_is_named() -> None:
    available = catalogue(releases("themisdb", "2.0"))
    text = explanation("themisdb", None, {"themis-geo": "latest"}, available)
    assert text == "installed themis-geo: 'latest' is not a version"


def test_installed_conflicts_lists_each_problem() -> None:
    installed = {"themisdb": "1.5.0", "themis-storage": "1.3.0", "themis-legacy": "2.0"}
    declared = {
        "themisdb": [
            Dependency("themis-storage", ">=1.4"),
            Dependency("themis-query", ">=1.4.5"),
            Dependency("themis-geo", ">=2", optional=True),
            Dependency("themis-legacy", conflicts=True),
        ],
        "themis-storage": [Dependency("themis-legacy", ">=2")],
        "themis-uninstalled": [Dependency("themis-nothing")],
    }
    assert installed_conflicts(installed, declared) == [
        "themisdb 1.5.0 needs themis-storage >=1.4, but themis-storage 1.3.0 is installed",
        "themisdb 1.5.0 needs themis-query >=1.4.5, which is not installed",
        "themisdb 1.5.0 conflicts with any themis-legacy, but themis-legacy 2.0 is installed",
    ]


def test_installed_conflicts_is_empty_when_all_fits() -> None:
    installed = {"themisdb": "1.5.0", "themis-storage": "1.4.0", "themis-geo": "2.0rc1"}
    declared = {
        "themisdb": [
            Dependency("themis-storage", ">=1.4,<2"),
            Dependency("themis-geo", ">=1", optional=True),  # an installed rc is judged as is
            Dependency("themis-legacy", conflicts=True),
            Dependency("themis-storage", "<1.4", conflicts=True),
        ],
    }
    assert installed_conflicts(installed, declared) == []


# --- property: a plan, applied, leaves every constraint satisfied ------------------------


def _final_state(installed: Mapping[str, str], plan: UpdatePlan) -> dict[str, str]:
    state = dict(installed)
    for step in plan.steps:
        assert state.get(step.product) == step.from_version
        state[step.product] = step.version
    return state


def _check_plan(
    target: str,
    installed: Mapping[str, str],
    available: Mapping[str, Sequence[Candidate]],
    plan: UpdatePlan,
    *,
    explicit: bool,
) -> None:
    state = _final_state(installed, plan)
    assert target in state
    for product, version in installed.items():
        if product == target and explicit:
            continue  # a named target version may be a downgrade
        assert Version(state[product]) >= Version(version), f"{product} was downgraded"
    declared = {
        p: next(c.dependencies for c in available[p] if c.version == v) for p, v in state.items()
    }
    assert installed_conflicts(state, declared) == []
    position = {step.product: i for i, step in enumerate(plan.steps)}
    for step in plan.steps:
        for need in declared[step.product]:
            if need.product in position and not need.conflicts:
                assert position[need.product] < position[step.product]


@st.composite
def _graphs(draw: st.DrawFn) -> tuple[dict[str, str], Catalogue]:
    count = draw(st.integers(2, 5))
    names = [f"p{i}" for i in range(count)]
    available: Catalogue = {}
    for i, name in enumerate(names):
        for minor in range(draw(st.integers(1, 3))):
            needs = [
                _random_need(draw, other, later=j > i)
                for j, other in enumerate(names)
                if j != i and draw(st.booleans())
            ]
            available.setdefault(name, []).append(release(name, f"{minor}.0", *needs))
    installed = {
        name: draw(st.sampled_from([c.version for c in available[name]]))
        for name in names
        if draw(st.booleans())
    }
    return installed, available


def _random_need(draw: st.DrawFn, product: str, *, later: bool) -> Dependency:
    # Needs only on later products, so no cycle; conflicts in either direction.
    kinds = ["required", "optional", "conflicts"] if later else ["conflicts"]
    kind = draw(st.sampled_from(kinds))
    low = draw(st.integers(0, 3))
    if kind == "conflicts":
        return Dependency(product, draw(st.sampled_from(["<", ">="])) + f"{low}.0", conflicts=True)
    return Dependency(product, f">={low}.0", optional=kind == "optional")


def _valid(state: Mapping[str, str], available: Mapping[str, Sequence[Candidate]]) -> bool:
    declared = {
        p: next(c.dependencies for c in available[p] if c.version == v) for p, v in state.items()
    }
    return installed_conflicts(state, declared) == []


def _feasible_targets(
    target: str,
    installed: Mapping[str, str],
    available: Mapping[str, Sequence[Candidate]],
    *,
    target_may_go_down: bool,
) -> set[Version]:
    """The target releases some complete assignment allows, by brute force: installed
    components kept or upgraded, the others present at any release or absent."""
    choices: list[list[str | None]] = []
    for product, candidates in available.items():
        versions: list[str | None] = [c.version for c in candidates]
        if product == target and target_may_go_down:
            pass
        elif product in installed or product == target:
            floor = Version(installed.get(product, "0"))
            versions = [v for v in versions if v is not None and Version(v) >= floor]
        if product not in installed and product != target:
            versions.append(None)
        choices.append(versions)
    feasible = set()
    for picked in product_of(*choices):
        state = {p: v for p, v in zip(available, picked, strict=True) if v is not None}
        if _valid(state, available):
            feasible.add(Version(state[target]))
    return feasible


@settings(max_examples=150, deadline=None)
@given(_graphs())
def test_every_plan_satisfies_every_constraint(graph: tuple[dict[str, str], Catalogue]) -> None:
    """Checked against brute force: a plan leaves every constraint satisfied, downgrades
    nothing and takes the newest target possible; a named version resolves exactly when
    some assignment allows it; a failure comes only when nothing fits, and says why."""
    installed, available = graph
    newest = _feasible_targets("p0", installed, available, target_may_go_down=False)
    if not newest:
        with pytest.raises(ResolutionFailed) as raised:
            resolve("p0", None, installed, available)
        assert raised.value.explanation
    else:
        plan = resolve("p0", None, installed, available)
        _check_plan("p0", installed, available, plan, explicit=False)
        assert Version(_final_state(installed, plan)["p0"]) == max(newest)
    named = _feasible_targets("p0", installed, available, target_may_go_down=True)
    for candidate in available["p0"]:
        if Version(candidate.version) not in named:
            with pytest.raises(ResolutionFailed):
                resolve("p0", candidate.version, installed, available)
            continue
        plan = resolve("p0", candidate.version, installed, available)
        _check_plan("p0", installed, available, plan, explicit=True)
        assert _final_state(installed, plan)["p0"] == candidate.version
