"""The node agent when what it reads is damaged or what it is sent is wrong: heartbeats
from a broken state dir, commands refused before anything is done, a heartbeat thread
and a start-up recovery that must survive their own failures. No broker: reports are
recorded at `app.send_task`, the seam every one goes through."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine.commands import CommandType
from workers import agent
from workers.ledger import Ledger

KEY = bytes.fromhex("cd" * 32)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> agent.AgentConfig:
    """An agent's environment (monkeypatched, as the tasks read it) and its config."""
    env = {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(tmp_path / "install"),
        "THEMIS_STATE_DIR": str(tmp_path / "state"),
        "THEMIS_NODE_KEY": KEY.hex(),
        "THEMIS_METRICS_FILE": str(tmp_path / "metrics.json"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "install").mkdir()
    (tmp_path / "state").mkdir()
    return agent.AgentConfig.from_env()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every report the agent sends: (task, what the signed envelope says)."""
    reports: list[tuple[str, dict[str, Any]]] = []

    def send_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
        reports.append((name, dict(kwargs["envelope"]["payload"])))

    monkeypatch.setattr(app, "send_task", send_task)
    agent._take_refusals()  # refusals of earlier tests are not this test's
    return reports


# ------------------------------------------------------------------ heartbeats


def test_a_heartbeat_from_a_damaged_state_dir_still_goes_out(
    config: agent.AgentConfig, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    state = config.state_dir
    (state / "node-state.json").write_text("{torn")
    (state / "points").write_text("not a directory")
    (state / "ledger").write_text("not a directory either")
    assert config.metrics_file is not None
    config.metrics_file.write_text(json.dumps([0.01, 80]))  # not the service's object
    agent.send_heartbeat(config)
    ((task, beat),) = sent
    assert task == agent.HEARTBEAT_TASK
    assert beat["installed_version"] == "" and beat["restore_points"] == []
    assert beat["active_job_id"] is None
    assert beat["service_healthy"] is False  # metrics that cannot be read mean unhealthy
    assert beat["node_id"] == "n1" and beat["disk_total_bytes"] > 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.25, 0.25),
        (3, 3.0),
        (0, 0.0),
        (True, None),  # a flag is not a figure
        ("0.1", None),
        (-0.5, None),
        (math.nan, None),
        (math.inf, None),
        (10**400, None),  # too large for a float
        (None, None),
    ],
)
def test_only_finite_non_negative_numbers_are_reported_as_metrics(
    tmp_path: Path, value: Any, expected: float | None
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"error_rate": value, "p99_ms": value, "healthy": True}))
    assert agent.read_service_metrics(metrics) == {
        "error_rate": expected,
        "p99_latency_ms": expected,
        "service_healthy": True,
    }


def test_the_heartbeat_thread_outlives_a_failed_beat(
    config: agent.AgentConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    second = threading.Event()

    def send(config: agent.AgentConfig) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("broker restarting")
        second.set()

    monkeypatch.setattr(agent, "send_heartbeat", send)
    thread = agent.HeartbeatThread(dataclasses.replace(config, heartbeat_seconds=0.01))
    thread.start()
    try:
        assert second.wait(30), "no heartbeat after the failed one"
    finally:
        thread.stopped.set()
        thread.join(30)
    assert not thread.is_alive()
    assert "heartbeat failed; retrying" in caplog.text and "broker restarting" in caplog.text


# ------------------------------------------------------------------ commands


def _apply_args(**extra: Any) -> dict[str, Any]:
    return {"sha256": "ab" * 32, "artifact_url": "http://dashboard/x", "version": "1.1", **extra}


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (_apply_args(size="big"), "argument size: wrong type"),
        (_apply_args(allow_downgrade="yes"), "argument allow_downgrade: wrong type"),
        ({"artifact_url": "http://dashboard/x", "version": "1.1"}, "without the bundle's sha256"),
    ],
    ids=["size", "allow_downgrade", "no-sha256"],
)
def test_a_signed_apply_with_wrong_arguments_is_refused(
    config: agent.AgentConfig,
    sent: list[tuple[str, dict[str, Any]]],
    args: dict[str, Any],
    reason: str,
) -> None:
    envelope = signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5")
    agent.apply_release(envelope=envelope)
    assert sent == [] and Ledger(config.state_dir).get("5") is None
    (refusal,) = agent._take_refusals()
    assert refusal["command"] == "apply" and reason in refusal["reason"]


def test_an_agent_without_a_key_refuses_every_command(
    config: agent.AgentConfig,
    sent: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THEMIS_NODE_KEY", "")
    envelope = signed_command(KEY, "n1", CommandType.HEARTBEAT, {})
    agent.heartbeat_now(envelope=envelope)
    assert sent == []  # not even the heartbeat: nothing could sign it
    (refusal,) = agent._take_refusals()
    assert refusal["reason"] == "this agent has no key to check commands with"


def test_an_unknown_traffic_role_is_not_written(
    config: agent.AgentConfig, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    agent.set_traffic_role(
        envelope=signed_command(KEY, "n1", CommandType.TRAFFIC_ROLE, {"role": "primary"})
    )
    assert not (config.state_dir / agent.TRAFFIC_ROLE_FILE).exists()
    assert agent.read_traffic_role(config.state_dir) == "" and sent == []


def test_an_apply_naming_no_bundle_fails_without_touching_the_node(
    config: agent.AgentConfig, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    args = {"sha256": "ab" * 32, "version": "1.1"}
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5"))
    finals = [report for task, report in sent if task == agent.FINISHED_TASK]
    assert [(f["ok"], f["error_code"], f["error_message"]) for f in finals] == [
        (False, "MANIFEST_INVALID", "job names no bundle to install")
    ]
    assert not (config.state_dir / agent.APPLIES_LOG).exists()
    assert not (config.state_dir / agent.DRAIN_LOG).exists()


# ------------------------------------------------------------------ start-up


def test_start_up_recovery_never_stops_the_worker(
    config: agent.AgentConfig,
    sent: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unreadable(self: Ledger) -> list[Any]:
        raise PermissionError(13, "Permission denied", str(self.dir))

    monkeypatch.setattr(Ledger, "take_over_interrupted", unreadable)
    assert agent.recover_at_start(config) == []
    assert "start-up recovery failed" in caplog.text and sent == []


def test_a_drain_log_that_cannot_be_written_does_not_stop_the_hook(
    config: agent.AgentConfig,
    sent: list[tuple[str, dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (config.state_dir / agent.DRAIN_LOG).mkdir()  # appending to it fails
    reporter = agent.JobReporter("5", "n1", KEY)
    agent.run_hook("true", "drain", reporter, "DRAINING", 3, state_dir=config.state_dir)
    assert "could not log drain of job 5" in caplog.text
    assert [(task, report["step"]) for task, report in sent] == [(agent.PROGRESS_TASK, "DRAINING")]
