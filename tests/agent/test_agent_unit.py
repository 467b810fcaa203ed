"""The node agent's own logic, without a broker (the seams: config from the
environment, files the node's service writes, the reports it sends)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import psutil
import pytest
from cryptography import x509

from tests.procs import wait_until
from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine.commands import CommandType
from updates.engine.devpki import Pki
from updates.engine.errors import ManifestInvalid
from updates.engine.reports import ReportType, verify_report
from updates.engine.truststore import (
    TRUST_STORE_FILE,
    install_trust_store,
    make_trust_store,
    trust_store_version,
)
from workers import agent

KEY = bytes.fromhex("ab" * 32)


def _payload(kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(kwargs["envelope"]["payload"])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(tmp_path / "install"),
        "THEMIS_STATE_DIR": str(tmp_path / "state"),
    }
    env.update(extra)
    (tmp_path / "install").mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    return env


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"THEMIS_NODE_ID": ""}, "THEMIS_NODE_ID"),
        ({"THEMIS_HEARTBEAT_SECONDS": "soon"}, "expected a number"),
        ({"THEMIS_HEARTBEAT_SECONDS": "0"}, "must be positive"),
    ],
)
def test_bad_agent_environment_names_the_variable(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        agent.AgentConfig.from_env(_env(tmp_path, **extra))


def test_heartbeat_carries_version_role_metrics_and_last_job(tmp_path: Path) -> None:
    config = agent.AgentConfig.from_env(
        _env(tmp_path, THEMIS_METRICS_FILE=str(tmp_path / "metrics.json"))
    )
    (tmp_path / "state" / "node-state.json").write_text(json.dumps({"installed_version": "1.6.0"}))
    config.status_file.write_text(json.dumps({"raft_role": "leader"}))
    (tmp_path / "metrics.json").write_text(json.dumps({"error_rate": 0.02, "p99_ms": 90}))
    (tmp_path / "state" / agent.LAST_JOB_FILE).write_text(json.dumps({"job_id": "7", "ok": True}))
    beat = agent.collect_heartbeat(config)
    assert beat["node_id"] == "n1" and beat["installed_version"] == "1.6.0"
    assert beat["raft_role"] == "leader"
    assert (beat["error_rate"], beat["p99_latency_ms"], beat["service_healthy"]) == (0.02, 90, True)
    assert beat["last_job"] == {"job_id": "7", "ok": True}
    assert beat["disk_free_bytes"] > 0 and beat["memory_available_bytes"] > 0


def test_heartbeat_load_disk_and_inventory_are_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = agent.AgentConfig.from_env(_env(tmp_path))
    asked: list[str] = []
    real_usage = psutil.disk_usage

    def usage(path: str) -> Any:
        asked.append(path)
        return real_usage(path)

    monkeypatch.setattr(psutil, "disk_usage", usage)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 2.5, 3.5))
    beat = agent.collect_heartbeat(config)
    # No release installed yet: the version is blank, not made up.
    assert beat["installed_version"] == "" and beat["components"][0]["version"] == ""
    assert asked == [str(config.install_dir)]  # the disk the releases go to
    assert beat["load_1m"] == 1.5
    assert beat["inventory"] == agent.host_inventory()
    config.install_dir.rmdir()
    agent.collect_heartbeat(config)
    assert asked[-1] == "/"  # no install dir yet: the root file system


def _store(pki: Pki, version: int) -> bytes:
    root = x509.load_pem_x509_certificate(pki.root.read_bytes())
    return make_trust_store(
        version=version,
        expires=datetime.now(UTC) + timedelta(days=30),
        roots=[root],
        key_path=pki.store_signer.key,
        cert_path=pki.store_signer.cert,
        chain_path=pki.chain,
    )


def test_the_heartbeat_names_the_installed_trust_store_and_sees_it_replaced(
    tmp_path: Path, test_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = agent.AgentConfig.from_env(_env(tmp_path))
    state = tmp_path / "state"
    reads: list[Path] = []

    def counted(state_dir: Path) -> int:
        reads.append(state_dir)
        return trust_store_version(state_dir)

    monkeypatch.setattr(agent, "trust_store_version", counted)
    assert agent.collect_heartbeat(config)["trust_store_version"] == 0  # the bootstrap anchor
    install_trust_store(state, _store(test_pki, 3), anchor=test_pki.root)
    assert agent.collect_heartbeat(config)["trust_store_version"] == 3
    read = len(reads)
    assert read == 2  # the bootstrap anchor, then the store
    assert agent.collect_heartbeat(config)["trust_store_version"] == 3
    assert len(reads) == read  # the store is parsed again only when its file changed
    install_trust_store(state, _store(test_pki, 4), anchor=test_pki.root)
    assert agent.collect_heartbeat(config)["trust_store_version"] == 4
    # Damaged in place (same file, new contents): unreadable, said so.
    store = state / TRUST_STORE_FILE
    store.write_text(store.read_text().replace('"signature"', '"signature_"'))
    assert agent.collect_heartbeat(config)["trust_store_version"] == -1
    store.unlink()
    assert agent.collect_heartbeat(config)["trust_store_version"] == 0


def test_unreadable_metrics_mean_unhealthy(tmp_path: Path) -> None:
    broken = tmp_path / "metrics.json"
    broken.write_text("{not json")
    assert agent.read_service_metrics(broken) == {"service_healthy": False}
    assert agent.read_service_metrics(None) == {}
    assert agent.read_raft_role(tmp_path / "missing.json") == ""


def test_task_for_another_node_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY=KEY.hex()))
    mine = signed_command(KEY, "n1", CommandType.ROLLBACK, {"point_id": None}, job_id="5")
    other = signed_command(KEY, "n2", CommandType.ROLLBACK, {"point_id": None}, job_id="5")
    assert agent.open_command(config, CommandType.ROLLBACK, other, {}) is None
    assert "refused" in caplog.text
    assert agent.open_command(config, CommandType.ROLLBACK, mine, {}) is not None


def test_the_next_heartbeat_tells_of_refused_commands_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    config = agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY=KEY.hex()))
    agent.send_heartbeat(config)  # whatever an earlier test left is taken
    other = signed_command(KEY, "n2", CommandType.ROLLBACK, {"point_id": None}, job_id="5")
    assert agent.open_command(config, CommandType.ROLLBACK, other, {}) is None
    agent.send_heartbeat(config)
    agent.send_heartbeat(config)
    told, after = (_payload(k) for k in sent[1:])
    (refusal,) = told["commands_refused"]
    assert refusal["command"] == "rollback" and "n2" in refusal["reason"]
    assert "commands_refused" not in after
    # Numbered in the node's own sequence, kept in its state dir across restarts.
    stored = json.loads((config.state_dir / agent.SEQUENCE_FILE).read_text())["seq"]
    assert stored == sent[-1]["envelope"]["seq"]


def test_final_report_is_kept_on_disk_and_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    reporter = agent.JobReporter("9", "n1", KEY)
    reporter.finish(ok=False, error=ManifestInvalid("bad hash"), state_dir=tmp_path)
    stored = json.loads((tmp_path / agent.LAST_JOB_FILE).read_text())
    assert stored["job_id"] == "9" and stored["error_code"] == "MANIFEST_INVALID"
    final = _payload(sent[0])
    assert final["error_message"] == "bad hash" and final["ok"] is False


def test_a_failure_that_is_no_engine_error_is_reported_unexpected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    agent.JobReporter("9", "n1", KEY).finish(ok=False, error=KeyError("plan"))
    final = _payload(sent[0])
    assert (final["error_code"], final["error_message"]) == ("UNEXPECTED", "'plan'")


def test_a_bundle_is_downloaded_into_the_state_dirs_downloads_folder(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"  # not made yet: made with its folder
    first = agent.bundle_download_path(state, "ab" * 32)
    assert first == state / "downloads" / f"{'ab' * 32}.bundle" and first.parent.is_dir()
    assert agent.bundle_download_path(state, "cd" * 32).parent == first.parent  # made once


def test_a_hooks_output_stays_out_of_the_agents_own(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "send_task", lambda *a, **k: None)
    agent.run_hook("echo drained-ok", "drain", agent.JobReporter("9", "n1"), "DRAINING", 3)
    assert "drained-ok" not in capfd.readouterr().out


def test_a_broker_failure_never_breaks_the_job(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tried: list[str] = []

    def down(name: str, *args: object, **kwargs: object) -> NoReturn:
        tried.append(name)
        raise ConnectionError("broker down")

    monkeypatch.setattr(app, "send_task", down)
    reporter = agent.JobReporter("9", "n1", KEY)
    # Neither raises (the job goes on) although no report could be sent; each failure is logged.
    reporter.step("PREFLIGHT", 2)
    reporter.finish(ok=True)
    assert tried == [agent.PROGRESS_TASK, agent.FINISHED_TASK]
    failures = [r for r in caplog.records if "could not report" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info and "broker down" in str(r.exc_info[1]) for r in failures)


def test_download_progress_is_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    # The throttle reads the agent's monotonic clock: here it moves only when told to.
    clock = [1000.0]
    monkeypatch.setattr(agent, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    report = agent.JobReporter("9", "n1", KEY).download_progress()
    for done in range(0, 100, 10):
        report(done, 100)  # all at one instant: the first is sent, the rest are not
    clock[0] += 0.49
    report(94, 100)  # still within half a second of the last report
    clock[0] += 0.01
    report(95, 100)  # half a second later
    report(100, 100)  # the last is always sent
    assert [_payload(k)["bytes_done"] for k in sent] == [0, 95, 100]


def test_download_progress_of_an_unknown_size_and_a_standstill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append(kwargs))
    report = agent.JobReporter("9", "n1", KEY).download_progress()
    report(0, 0, rate=0.0, eta=0.0)  # no size known yet, nothing moving
    (first,) = (_payload(k) for k in sent)
    assert (first["percent"], first["bytes_per_second"], first["eta_seconds"]) == (2, 0, 0)


def test_hooks_fail_with_the_command_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "send_task", lambda *a, **k: None)
    reporter = agent.JobReporter("9", "n1")
    agent.run_hook(None, "drain", reporter, "DRAINING", 3)  # nothing configured
    agent.run_hook("true", "drain", reporter, "DRAINING", 3)
    with pytest.raises(agent.ApplyHookFailed, match="drain command failed"):
        agent.run_hook("echo nope >&2; exit 3", "drain", reporter, "DRAINING", 3)


def test_a_failed_hook_quotes_the_end_of_its_error_output_cut_to_a_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "send_task", lambda *a, **k: None)
    reporter = agent.JobReporter("9", "n1")
    noisy = "printf '%0300d' 0 | tr 0 x >&2; exit 4"
    with pytest.raises(agent.ApplyHookFailed) as failed:
        agent.run_hook(noisy, "rejoin", reporter, "REJOINING", 95)
    assert str(failed.value) == f"rejoin command failed (4): {'x' * agent.HOOK_STDERR_CHARS}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_hook_past_its_deadline_fails_and_nothing_it_started_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell's child holds the error pipe open: without killing the whole group, the
    agent would wait for it however long it runs."""
    monkeypatch.setattr(app, "send_task", lambda *a, **k: None)
    monkeypatch.setattr(agent, "HOOK_TIMEOUT_SECONDS", 0.5)
    pid_file = tmp_path / "child.pid"
    hung = f"sleep 60 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    with pytest.raises(agent.ApplyHookFailed, match=r"drain command timed out after 0.5 s"):
        agent.run_hook(hung, "drain", agent.JobReporter("9", "n1"), "DRAINING", 3)
    assert time.monotonic() - started < 30  # not the child's 60 s
    child = int(pid_file.read_text())
    assert wait_until(lambda: not _alive(child), 10), f"the hook's child {child} still runs"


def test_traffic_role_written_only_for_this_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "send_task", lambda *a, **k: None)
    for key, value in _env(tmp_path, THEMIS_NODE_KEY=KEY.hex()).items():
        monkeypatch.setenv(key, value)
    role = {"role": "active"}
    agent.set_traffic_role(envelope=signed_command(KEY, "n2", CommandType.TRAFFIC_ROLE, role))
    agent.set_traffic_role(node_id="n1", role="active")  # unsigned
    assert not (tmp_path / "state" / "traffic-role.json").exists()
    agent.set_traffic_role(envelope=signed_command(KEY, "n1", CommandType.TRAFFIC_ROLE, role))
    assert json.loads((tmp_path / "state" / "traffic-role.json").read_text()) == {"role": "active"}


def test_reports_are_signed_with_the_node_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(app, "send_task", lambda name, kwargs, queue: sent.append((name, kwargs)))
    key = bytes.fromhex("ab" * 32)
    config = agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY="ab" * 32))
    assert config.report_key == key
    agent.send_heartbeat(config)
    # In the state dir the heartbeats use, as every reporter of the agent's jobs is.
    agent.JobReporter("9", "n1", key, state_dir=config.state_dir).step("PREFLIGHT", 2)
    (heartbeat_task, heartbeat), (progress_task, progress) = sent
    assert heartbeat_task == agent.HEARTBEAT_TASK and set(heartbeat) == {"envelope"}
    beat = verify_report(key, heartbeat["envelope"], expected_type=ReportType.HEARTBEAT)
    step = verify_report(key, progress["envelope"], expected_type=ReportType.JOB_PROGRESS)
    assert beat.payload["node_id"] == "n1" and step.payload["step"] == "PREFLIGHT"
    assert step.seq > beat.seq  # one sequence for every report of the node


def test_a_malformed_node_key_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="THEMIS_NODE_KEY"):
        agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY="not-hex"))
    with pytest.raises(RuntimeError, match="THEMIS_NODE_KEY"):
        agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY="abcd"))  # too short


def test_an_agent_with_only_its_node_id_runs_on_the_defaults() -> None:
    config = agent.AgentConfig.from_env({"THEMIS_NODE_ID": "n7"})
    assert config == agent.AgentConfig(
        "n7",
        Path("var/nodes/n7/install"),
        Path("var/nodes/n7/state"),
        Path("var/nodes/n7/state/service-status.json"),
        5.0,
        trust_anchor=Path("/etc/themis/trust/root.pem"),
        product="themisdb",
        download_concurrency=4,
        points_keep=3,
        points_cleanup_seconds=300.0,
    )
    assert (config.health_cmd, config.drain_cmd, config.rejoin_cmd, config.report_key) == (
        None,
        None,
        None,
        None,
    )


def test_every_agent_variable_is_read(tmp_path: Path) -> None:
    env = {
        "THEMIS_NODE_ID": "n8",
        "THEMIS_INSTALL_DIR": str(tmp_path / "i"),
        "THEMIS_STATE_DIR": str(tmp_path / "s"),
        "THEMIS_STATUS_FILE": str(tmp_path / "status.json"),
        "THEMIS_HEARTBEAT_SECONDS": "2.5",
        "THEMIS_TRUST_ANCHOR": str(tmp_path / "root.pem"),
        "THEMIS_HEALTH_CMD": "check-health",
        "THEMIS_HEALTH_URL": "http://127.0.0.1:8080/health",
        "THEMIS_PRODUCT": "otherdb",
        "THEMIS_DRAIN_CMD": "drain-me",
        "THEMIS_REJOIN_CMD": "rejoin-me",
        "THEMIS_NODE_KEY": "cd" * 16,
        "THEMIS_METRICS_FILE": str(tmp_path / "metrics.json"),
        "THEMIS_VERIFY_URL": "http://127.0.0.1:9090",
    }
    config = agent.AgentConfig.from_env(env)
    assert config == agent.AgentConfig(
        "n8",
        tmp_path / "i",
        tmp_path / "s",
        tmp_path / "status.json",
        2.5,
        trust_anchor=tmp_path / "root.pem",
        health_cmd="check-health",
        health_url="http://127.0.0.1:8080/health",
        product="otherdb",
        drain_cmd="drain-me",
        rejoin_cmd="rejoin-me",
        metrics_file=tmp_path / "metrics.json",
        report_key=bytes.fromhex("cd" * 16),  # 16 bytes: the shortest key taken
        verify_url="http://127.0.0.1:9090",
    )
    # the state dir's status file unless one is named; empty commands are no commands
    blank = {**env, "THEMIS_HEALTH_CMD": "", "THEMIS_HEALTH_URL": "", "THEMIS_DRAIN_CMD": ""}
    blank.update(THEMIS_REJOIN_CMD="", THEMIS_VERIFY_URL="", THEMIS_METRICS_FILE="")
    del blank["THEMIS_STATUS_FILE"]
    unset = agent.AgentConfig.from_env(blank)
    assert unset.status_file == tmp_path / "s" / "service-status.json"
    assert (unset.health_cmd, unset.health_url, unset.drain_cmd, unset.rejoin_cmd) == (
        None,
        None,
        None,
        None,
    )
    assert (unset.verify_url, unset.metrics_file) == (None, None)


@pytest.mark.parametrize("seconds", ["0", "-1"])
def test_a_heartbeat_period_of_zero_or_less_is_refused(tmp_path: Path, seconds: str) -> None:
    with pytest.raises(RuntimeError, match="THEMIS_HEARTBEAT_SECONDS: must be positive"):
        agent.AgentConfig.from_env(_env(tmp_path, THEMIS_HEARTBEAT_SECONDS=seconds))


def test_a_node_key_shorter_than_16_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="THEMIS_NODE_KEY: expected the hex key"):
        agent.AgentConfig.from_env(_env(tmp_path, THEMIS_NODE_KEY="cd" * 15))


class BeatsAndCleanups:
    """Stands in for send_heartbeat and cleanup_restore_points: when each was called."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, object]] = []
        self.cleanups: list[float] = []

    def beat(self, config: object) -> None:
        self.beats.append((time.monotonic(), config))

    def cleanup(self, config: object) -> None:
        self.cleanups.append(time.monotonic())


def _heartbeat_config(tmp_path: Path, *, beat: float, cleanup: float) -> agent.AgentConfig:
    config = agent.AgentConfig.from_env(_env(tmp_path))
    return dataclasses.replace(config, heartbeat_seconds=beat, points_cleanup_seconds=cleanup)


def _run_heartbeat_thread(
    config: agent.AgentConfig, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> tuple[BeatsAndCleanups, agent.HeartbeatThread]:
    calls = BeatsAndCleanups()
    monkeypatch.setattr(agent, "send_heartbeat", calls.beat)
    monkeypatch.setattr(agent, "cleanup_restore_points", calls.cleanup)
    thread = agent.HeartbeatThread(config)
    thread.start()
    time.sleep(seconds)
    thread.stopped.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return calls, thread


def test_the_heartbeat_thread_is_a_named_daemon_that_beats_with_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _heartbeat_config(tmp_path, beat=0.02, cleanup=3600)
    calls, thread = _run_heartbeat_thread(config, monkeypatch, 0.3)
    # A daemon: a worker shutting down never waits for it.
    assert (thread.name, thread.daemon) == ("themis-heartbeat", True)
    assert len(calls.beats) >= 3 and all(c is config for _, c in calls.beats)
    # The first cleanup waits a whole period (start-up recovery holds the node lock).
    assert calls.cleanups == []


def test_the_heartbeat_thread_cleans_up_once_a_period_and_keeps_beating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _heartbeat_config(tmp_path, beat=0.01, cleanup=0.2)
    started = time.monotonic()
    calls, _ = _run_heartbeat_thread(config, monkeypatch, 1.0)
    elapsed = time.monotonic() - started
    assert 1 <= len(calls.cleanups) <= elapsed / 0.2 + 1
    assert all(b - a >= 0.2 for a, b in zip(calls.cleanups, calls.cleanups[1:], strict=False))
    # Heartbeats went on after the cleanups (one every 10 ms for most of a second).
    assert sum(at > calls.cleanups[0] for at, _ in calls.beats) >= 5
