"""Pre-flight against the node's other components: each kind of dependency met or not,
DEPENDENCY_UNMET (exit 20) before anything is written, the components a caller names
added to those the state dir records."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    REPO,
    Node,
    bundles_fixture,
    node_fixture,
    snapshot,
)
from updates.engine.apply import apply_bundle
from updates.engine.errors import DependencyUnmet, PreflightFailed
from updates.engine.manifest import Dependency
from updates.engine.preflight import dependency_checks, preflight
from updates.engine.state import NodeState, save_state

STORAGE = "themis-storage"


@pytest.mark.parametrize(
    ("dependency", "installed", "detail"),
    [
        (Dependency(STORAGE, ">=1.4"), {},
         "themis-storage is not installed, need themis-storage >=1.4"),
        (Dependency(STORAGE, ">=1.4"), {STORAGE: "1.3"},
         "themis-storage 1.3 does not satisfy >=1.4"),
        (Dependency(STORAGE), {}, "themis-storage is not installed, need any themis-storage"),
        (Dependency(STORAGE, ">=1.4", optional=True), {STORAGE: "1.3"},
         "themis-storage 1.3 does not satisfy >=1.4"),
        (Dependency(STORAGE, "<2", conflicts=True), {STORAGE: "1.3"},
         "themis-storage 1.3 is within <2, which this release excludes"),
        (Dependency(STORAGE, conflicts=True), {STORAGE: "9"},
         "themis-storage 9 is within any version, which this release excludes"),
    ],
)  # fmt: skip
def test_an_unmet_dependency_is_named(
    dependency: Dependency, installed: dict[str, str], detail: str
) -> None:
    (check,) = dependency_checks([dependency], installed)
    assert not check.ok
    assert (check.name, check.detail) == (f"dependency:{STORAGE}", detail)
    assert (check.value, check.threshold) == (installed.get(STORAGE), dependency.constraint)


@pytest.mark.parametrize(
    ("dependency", "installed"),
    [
        (Dependency(STORAGE, ">=1.4"), {STORAGE: "1.4.2"}),
        (Dependency(STORAGE, ">=1.4"), {STORAGE: "2.0rc1"}),  # installed: taken as it is
        (Dependency(STORAGE, ">=1.4", optional=True), {}),
        (Dependency(STORAGE, ">=1.4", optional=True), {STORAGE: "1.5"}),
        (Dependency(STORAGE, "<1.4", conflicts=True), {}),
        (Dependency(STORAGE, "<1.4", conflicts=True), {STORAGE: "1.4"}),
    ],
)
def test_a_met_dependency_passes(dependency: Dependency, installed: dict[str, str]) -> None:
    (check,) = dependency_checks([dependency], installed)
    assert check.ok and check.name == f"dependency:{STORAGE}"


def test_the_first_unmet_of_several_is_named_with_how_many_more(node: Node) -> None:
    needs = [Dependency("a", ">=1"), Dependency("b", ">=1"), Dependency("c", ">=1")]
    bundle = node.maker.make("2.0", NEW_FILES, dependencies=needs)
    report = preflight(bundle, target=node.target, state_dir=node.state, components={"b": "1.0"})
    with pytest.raises(DependencyUnmet) as err:
        report.raise_if_failed()
    assert str(err.value) == "dependency:a: a is not installed, need a >=1 (+1 more)"
    assert err.value.code == "DEPENDENCY_UNMET" and err.value.exit_code == 20


def test_components_named_by_the_caller_add_to_the_state_dirs(node: Node) -> None:
    save_state(node.state, NodeState(components={"glibc": "2.36", STORAGE: "1.0"}))
    needs = [Dependency("glibc", ">=2.31"), Dependency(STORAGE, ">=1.4")]
    bundle = node.maker.make("2.0", NEW_FILES, dependencies=needs)
    assert not preflight(bundle, target=node.target, state_dir=node.state).ok
    report = preflight(
        bundle, target=node.target, state_dir=node.state, components={STORAGE: "1.4"}
    )
    assert report.ok, report.failures()


def test_an_apply_with_an_unmet_dependency_writes_nothing(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies=[Dependency(STORAGE, ">=1.4")])
    listing, before = sorted(node.state.rglob("*")), snapshot(node.target)
    with pytest.raises(DependencyUnmet, match="themis-storage 1.3 does not satisfy >=1.4"):
        apply_bundle(bundle, **node.kwargs(), components={STORAGE: "1.3"})
    assert snapshot(node.target) == before
    assert sorted(node.state.rglob("*")) == listing  # not even the lock file
    result = apply_bundle(bundle, **node.kwargs(), components={STORAGE: "1.4"})
    assert result.version_to == "2.0"


def test_a_dependency_is_named_before_a_full_disk(node: Node) -> None:
    """Both failed: the dependency comes first (a retry will not fix it), still exit 20."""
    bundle = node.maker.make("2.0", NEW_FILES, dependencies=[Dependency(STORAGE, ">=1")])
    report = preflight(bundle, target=node.target, state_dir=node.state, min_memory_mb=1 << 30)
    assert [c.name for c in report.failures()] == ["memory", f"dependency:{STORAGE}"]
    with pytest.raises(DependencyUnmet) as err:
        report.raise_if_failed()
    assert str(err.value).startswith(f"dependency:{STORAGE}: ") and "(+1 more)" in str(err.value)
    assert isinstance(err.value, PreflightFailed)


def test_the_cli_exits_20_naming_the_dependency(node: Node, tmp_path: Path) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies=[Dependency(STORAGE, ">=1")])
    argv: list[str | Path] = ["apply", bundle, "--target", node.target, "--state-dir", node.state]
    proc = subprocess.run(
        node.cli(*argv, "--trust-anchor", node.maker.trust_anchor),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 20
    assert "dependency:themis-storage: themis-storage is not installed" in proc.stderr
