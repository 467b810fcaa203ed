"""Pre-flight: disk, memory and dependency checks from the manifest alone."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (  # noqa: F401  (fixtures)
    NEW_FILES,
    REPO,
    Node,
    bundles_fixture,
    node_fixture,
    small_tmpfs_fixture,
    snapshot,
)
from updates.engine.apply import apply_bundle
from updates.engine.errors import PreflightFailed
from updates.engine.preflight import preflight
from updates.engine.state import NodeState, save_state


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_report_has_every_check_with_figure_and_threshold(node: Node) -> None:
    save_state(node.state, NodeState(components={"glibc": "2.36", "kernel": "6.1.0"}))
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"glibc": ">=2.31", "kernel": ">=5"})
    report = preflight(bundle, target=node.target, state_dir=node.state).to_dict()
    assert report["ok"] and report["version"] == "2.0"
    checks = _checks(report)
    assert set(checks) == {
        "disk_target", "disk_state_dir", "memory", "dependency:glibc", "dependency:kernel",
    }  # fmt: skip
    size = bundle.stat().st_size
    assert checks["disk_target"]["threshold"] == 2 * size
    assert checks["disk_target"]["value"] >= 2 * size
    assert checks["dependency:glibc"] == {
        "name": "dependency:glibc", "ok": True, "value": "2.36", "threshold": ">=2.31",
        "unit": "", "detail": "glibc 2.36 satisfies >=2.31",
    }  # fmt: skip


def test_failed_dependency_exit_20_before_anything_is_written(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"glibc": ">=2.40", "zlib": "~=1.3"})
    save_state(node.state, NodeState(components={"glibc": "2.36"}))
    listing = sorted(node.state.rglob("*"))
    before = snapshot(node.target)
    with pytest.raises(PreflightFailed, match="glibc 2.36 does not satisfy >=2.40") as err:
        apply_bundle(bundle, **node.kwargs())
    assert err.value.exit_code == 20 and "+1 more" in str(err.value)
    assert snapshot(node.target) == before
    assert sorted(node.state.rglob("*")) == listing  # not even the lock file


def test_memory_floor(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES)
    report = preflight(bundle, target=node.target, state_dir=node.state, min_memory_mb=1 << 30)
    assert not report.ok
    assert [c.name for c in report.failures()] == ["memory"]


def test_disk_space_on_small_filesystem(node: Node, small_tmpfs: Path) -> None:
    bundle = node.maker.make("2.0", {"big": __import__("os").urandom(1500 << 10)})
    state = small_tmpfs / "not-yet-created" / "state"
    report = preflight(bundle, target=node.target, state_dir=state)
    assert [c.name for c in report.failures()] == ["disk_state_dir"]
    assert not state.exists()


def test_cli_prints_report_and_exits_20(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, dependencies={"zlib": ">=1"})
    args: list[str | Path] = [
        "preflight",
        bundle,
        "--target",
        node.target,
        "--state-dir",
        node.state,
    ]
    proc = subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 20
    report = json.loads(proc.stdout)
    assert not report["ok"] and not _checks(report)["dependency:zlib"]["ok"]
    assert proc.stderr.count("\n") == 1 and "dependency:zlib" in proc.stderr
    save_state(node.state, NodeState(components={"zlib": "1.3"}))
    proc = subprocess.run(node.cli(*args), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"]


def test_preflight_is_fast(node: Node) -> None:
    bundle = node.maker.make("2.0", {"big": b"\0" * (20 << 20)})
    preflight(bundle, target=node.target, state_dir=node.state)  # warm imports
    times = []
    for _ in range(5):
        start = time.perf_counter()
        preflight(bundle, target=node.target, state_dir=node.state)
        times.append(time.perf_counter() - start)
    assert sorted(times)[2] < 0.1  # reads the manifest, not the 20 MB payload


def test_min_version_needs_the_upgrade_path_first(node: Node) -> None:
    save_state(node.state, NodeState(installed_version="1.2.0", highest_version="1.2.0"))
    bundle = node.maker.make("2.0", NEW_FILES, min_version="1.5")
    listing = sorted(node.state.rglob("*"))
    before = snapshot(node.target)
    with pytest.raises(PreflightFailed, match="installed 1.2.0, bundle needs at least 1.5") as err:
        apply_bundle(bundle, **node.kwargs())
    assert err.value.exit_code == 20
    assert snapshot(node.target) == before
    assert sorted(node.state.rglob("*")) == listing
    save_state(node.state, NodeState(installed_version="1.5.0", highest_version="1.5.0"))
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and _checks(report.to_dict())["min_version"]["ok"]


def test_min_version_does_not_block_a_fresh_node(node: Node) -> None:
    bundle = node.maker.make("2.0", NEW_FILES, min_version="1.5")
    report = preflight(bundle, target=node.target, state_dir=node.state)
    assert report.ok and "min_version" not in _checks(report.to_dict())
