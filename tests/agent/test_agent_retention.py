"""Restore point retention on the node: the agent's settings, the count an apply job
keeps, the periodic cleanup (by age and disk use, never what a rollback of the installed
version needs; it waits while a job runs or the engine is busy) and the points' disk use
in every heartbeat."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

# The job tests' `node` fixture is used by name: its parameters "redefine" the import.
# ruff: noqa: F811
from tests.agent.test_agent_jobs import Node, _no_faults, node  # noqa: F401  (fixtures)
from tests.helpers import MakeBundle
from tests.procs import wait_until
from updates.engine import apply as engine
from updates.engine.lock import NodeLock
from updates.engine.restore import points_disk_usage
from updates.engine.retention import Retention
from workers import agent
from workers.ledger import JobKind, Ledger

pytestmark = pytest.mark.usefixtures("_no_faults")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "install").mkdir(exist_ok=True)
    return {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(tmp_path / "install"),
        "THEMIS_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def test_retention_settings_come_from_the_environment(tmp_path: Path) -> None:
    config = agent.AgentConfig.from_env(_env(tmp_path))
    assert (config.points_keep, config.points_max_age, config.points_max_bytes) == (3, None, None)
    assert config.points_cleanup_seconds == 300.0
    config = agent.AgentConfig.from_env(
        _env(
            tmp_path,
            THEMIS_RESTORE_POINTS_KEEP="5",
            THEMIS_RESTORE_POINTS_MAX_AGE="30d",
            THEMIS_RESTORE_POINTS_MAX_BYTES="2G",
            THEMIS_RESTORE_POINTS_CLEANUP_SECONDS="60",
        )
    )
    assert config.retention == Retention(5, 30 * 86400.0, 2 << 30)
    assert config.points_cleanup_seconds == 60.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("THEMIS_RESTORE_POINTS_KEEP", "0"),
        ("THEMIS_RESTORE_POINTS_KEEP", "many"),
        ("THEMIS_RESTORE_POINTS_MAX_AGE", "soon"),
        ("THEMIS_RESTORE_POINTS_MAX_AGE", "-1d"),
        ("THEMIS_RESTORE_POINTS_MAX_BYTES", "lots"),
        ("THEMIS_RESTORE_POINTS_MAX_BYTES", "5X"),
        ("THEMIS_RESTORE_POINTS_CLEANUP_SECONDS", "0"),
        ("THEMIS_RESTORE_POINTS_CLEANUP_SECONDS", "never"),
        ("THEMIS_RESTORE_POINTS_CLEANUP_SECONDS", "inf"),
    ],
)
def test_a_bad_retention_setting_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(RuntimeError, match=name):
        agent.AgentConfig.from_env(_env(tmp_path, **{name: value}))


def _install(node: Node, make_bundle: MakeBundle, versions: list[str]) -> list[str]:
    """Apply `versions` through the engine (keeping every point); each rewrites a 64 KiB
    incompressible file, so each point holds 64 KiB of its own."""
    ids = []
    for version in versions:
        files = {"lib/data.bin": os.urandom(64 << 10), "bin/themisd": version.encode()}
        bundle = make_bundle(version, files=files)
        result = engine.apply_bundle(
            bundle,
            target=node.install,
            state_dir=node.state,
            trust_anchor=Path(node.env["THEMIS_TRUST_ANCHOR"]),
            keep=100,
        )
        ids.append(result.restore_point)
    return ids


def _age(node: Node, point_id: str, seconds: float) -> None:
    path = node.state / "points" / point_id / "point.json"
    data = json.loads(path.read_bytes())
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))
    path.write_text(json.dumps(data))


def _point_ids(node: Node) -> list[str]:
    return [p["id"] for p in engine.list_points(node.state)]


def _config(node: Node, monkeypatch: pytest.MonkeyPatch, **env: str) -> agent.AgentConfig:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
        node.env[name] = value
    return node.config


def test_an_apply_job_keeps_as_many_points_as_configured(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(node, monkeypatch, THEMIS_RESTORE_POINTS_KEEP="1")
    assert len(_point_ids(node)) == 1  # the fixture's install of 1.0
    node.apply("8", "1.1")
    assert node.finals("8")[0]["ok"] is True
    [kept] = engine.list_points(node.state)
    assert kept["to_version"] == "1.1"


def test_the_cleanup_applies_age_and_disk_use_but_keeps_the_rollback_point(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle
) -> None:
    first = _point_ids(node)
    ids = first + _install(node, make_bundle, ["2.1", "2.2", "2.3"])
    for point_id in ids:
        _age(node, point_id, 40 * 86400)
    _age(node, ids[2], 3600)
    config = _config(
        node,
        monkeypatch,
        THEMIS_RESTORE_POINTS_KEEP="10",
        THEMIS_RESTORE_POINTS_MAX_AGE="30d",
    )
    # Too old: all but the one made an hour ago and the installed 2.3's rollback point.
    assert agent.cleanup_restore_points(config) == ids[:2]
    assert _point_ids(node) == ids[2:]
    config = _config(node, monkeypatch, THEMIS_RESTORE_POINTS_MAX_BYTES="0")
    assert agent.cleanup_restore_points(config) == ids[2:3]
    assert _point_ids(node) == ids[3:]
    assert agent.cleanup_restore_points(config) == []


def test_the_cleanup_waits_while_a_job_runs_or_the_engine_is_busy(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle
) -> None:
    ids = _point_ids(node) + _install(node, make_bundle, ["2.1", "2.2"])
    config = _config(node, monkeypatch, THEMIS_RESTORE_POINTS_KEEP="1")
    ledger = Ledger(node.state)
    ledger.claim("41", JobKind.APPLY, target_version="2.3", version_from="2.2")
    assert agent.cleanup_restore_points(config) is None  # a job of this agent runs
    assert _point_ids(node) == ids
    ledger.release("41")
    with NodeLock(node.state, command="apply"):
        assert agent.cleanup_restore_points(config) is None  # the engine is busy
    assert _point_ids(node) == ids
    assert agent.cleanup_restore_points(config) == ids[:2]


def test_the_heartbeat_thread_runs_the_cleanup_every_period(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle
) -> None:
    ids = _point_ids(node) + _install(node, make_bundle, ["2.1"])
    config = _config(
        node,
        monkeypatch,
        THEMIS_RESTORE_POINTS_KEEP="1",
        THEMIS_HEARTBEAT_SECONDS="0.05",
        THEMIS_RESTORE_POINTS_CLEANUP_SECONDS="0.1",
    )
    beats: list[int] = []
    monkeypatch.setattr(agent, "send_heartbeat", lambda _config: beats.append(1))
    thread = agent.HeartbeatThread(config)
    thread.start()
    try:
        assert wait_until(lambda: _point_ids(node) == ids[1:], timeout=30, interval=0.05)
    finally:
        thread.stopped.set()
        thread.join(timeout=30)
    assert beats  # the heartbeat went on


def test_the_heartbeat_reports_the_points_disk_use(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle
) -> None:
    _install(node, make_bundle, ["2.1", "2.2"])
    beat = agent.collect_heartbeat(node.config)
    assert beat["restore_points_bytes"] == points_disk_usage(node.state)
    assert beat["restore_points_bytes"] >= 64 << 10  # 2.2's point: 2.1's data.bin
    # Pruning changes the points dir: the next heartbeat says so.
    engine.prune_points(node.state, 1)
    assert agent.collect_heartbeat(node.config)["restore_points_bytes"] == points_disk_usage(
        node.state
    )


def test_the_heartbeat_lists_the_points_and_reads_them_again_only_when_they_change(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle
) -> None:
    _install(node, make_bundle, ["2.1", "2.2"])
    listed: list[Path] = []
    real_list = engine.list_points

    def counted(state_dir: Path) -> list[dict[str, Any]]:
        listed.append(state_dir)
        return real_list(state_dir)

    monkeypatch.setattr(engine, "list_points", counted)
    monkeypatch.setattr(agent, "_points_cache", {})
    keys = ("id", "version", "created", "file_count", "size")
    expected = [{k: p[k] for k in keys} for p in real_list(node.state)]
    assert len(expected) == 3 and all(p["id"] and p["created"] for p in expected)
    assert agent.collect_heartbeat(node.config)["restore_points"] == expected
    assert agent.collect_heartbeat(node.config)["restore_points"] == expected
    assert listed == [node.state]  # the second heartbeat: from the cache
    engine.prune_points(node.state, 1)
    kept = [{k: p[k] for k in keys} for p in real_list(node.state)]
    assert len(kept) == 1 and kept[0] in expected
    assert agent.collect_heartbeat(node.config)["restore_points"] == kept
    assert len(listed) == 2  # the points changed: read again


def test_a_node_without_points_reports_zero(tmp_path: Path) -> None:
    config = agent.AgentConfig.from_env(_env(tmp_path))
    assert agent.collect_heartbeat(config)["restore_points_bytes"] == 0
    assert agent.cleanup_restore_points(config) == []
