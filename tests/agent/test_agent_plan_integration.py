"""Multi-component updates end to end: a real redis-server, a real Celery agent process
for a node of three components (each installed at 1.0 from real OpenSSL-signed bundles),
signed plan commands sent through the broker, the agent's reports read back from the
broker's `dashboard` queue."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tests import procs
from tests.agent.bundle_server import BundleServer
from tests.agent.plan_fixtures import (
    NODE,
    PRIMARY,
    QUERY,
    STORAGE,
    PlanNode,
    new_plan_node,
    upgrade_steps,
)
from updates.engine.devpki import Pki
from updates.engine.journal import JOURNAL_FILE
from updates.engine.reports import HEARTBEAT_QUEUE
from updates.engine.state import load_state
from workers import agent
from workers.ledger import EntryState, Ledger
from workers.plan import JOURNAL_FILE as PLAN_JOURNAL

pytestmark = pytest.mark.slow

JOB_SECONDS = 120


@pytest.fixture
def node(tmp_path: Path, test_pki: Pki, bundle_server: BundleServer) -> PlanNode:
    return new_plan_node(tmp_path / "node", test_pki, bundle_server)


@pytest.fixture
def broker(redis_url: str) -> Iterator[Celery]:
    """A client of the suite's redis-server, as the dashboard's outbox relay is one."""
    client = Celery(broker=redis_url)
    yield client
    client.close()


def _agent_env(node: PlanNode, redis_url: str, **health: str) -> dict[str, str]:
    env = procs.inherited_env(drop=frozenset({"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}))
    env.update(node.env(THEMIS_COMPONENTS=node.components_env(**health)))
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1", THEMIS_HEARTBEAT_SECONDS="1")
    return env


def _send(broker: Celery, node: PlanNode, job_id: str) -> None:
    envelope = node.envelope(job_id, node.plan_args(upgrade_steps(node)))
    broker.send_task("agent.apply", kwargs={"envelope": envelope}, queue=f"node.{NODE}")


def _finished(node: PlanNode, job_id: str) -> bool:
    entry = Ledger(node.state_dir(PRIMARY)).get(job_id)
    return entry is not None and entry.state is EntryState.FINISHED


def _settled(node: PlanNode, job_id: str) -> bool:
    """Finished, and its plan journal removed (just after the final report)."""
    return _finished(node, job_id) and not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()


def _reports(redis_url: str, task: str, job_id: str) -> list[dict[str, Any]]:
    """The agent's reports of one kind on the `dashboard` queue (nobody consumes it
    here), each the signed envelope's payload."""
    found = []
    for raw in redis.Redis.from_url(redis_url).lrange("dashboard", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] != task:
            continue
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        payload = kwargs["envelope"]["payload"]
        if payload.get("job_id") == job_id:
            found.append(payload)
    return found


def _files(node: PlanNode) -> dict[str, dict[str, bytes]]:
    """Every component's installed files, byte for byte."""
    return {
        product: {
            str(p.relative_to(node.install_dir(product))): p.read_bytes()
            for p in sorted(node.install_dir(product).rglob("*"))
            if p.is_file()
        }
        for product in (PRIMARY, STORAGE, QUERY)
    }


def _versions(node: PlanNode) -> dict[str, str | None]:
    return {
        product: load_state(node.state_dir(product)).installed_version
        for product in (PRIMARY, STORAGE, QUERY)
    }


def _applies(node: PlanNode) -> list[tuple[str, str]]:
    path = node.state_dir(PRIMARY) / agent.APPLIES_LOG
    lines = path.read_text().splitlines() if path.exists() else []
    return [(entry["job"], entry["kind"]) for entry in map(json.loads, lines)]


def test_a_step_failing_its_health_check_rolls_back_the_steps_before_it_byte_for_byte(
    node: PlanNode, broker: Celery, redis_url: str, tmp_path: Path
) -> None:
    trees, files, versions = node.trees(), _files(node), _versions(node)
    worker = procs.agent(NODE, _agent_env(node, redis_url, **{QUERY: "exit 3"}), tmp_path)
    try:
        _send(broker, node, "21")
        done = procs.wait_until(lambda: _settled(node, "21"), JOB_SECONDS)
        assert done, worker.output()[-4000:]
        # Storage 1.1 went on and came off again; query 1.1 failed its health check and
        # the engine took it off; themisdb 2.0 never started.
        assert _applies(node) == [("21", "apply"), ("21", "apply"), ("21", "rollback")]
        assert node.trees() == trees and _files(node) == files
        assert _versions(node) == versions
        assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
        for product in (PRIMARY, STORAGE, QUERY):
            assert not (node.state_dir(product) / JOURNAL_FILE).exists()
        got = procs.wait_until(lambda: bool(_reports(redis_url, agent.FINISHED_TASK, "21")), 10)
        assert got, worker.output()[-4000:]
        (final,) = _reports(redis_url, agent.FINISHED_TASK, "21")
        assert final["ok"] is False
        assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
        assert final["error_message"].startswith("step 2 of 3 (themis-query 1.1): ")
        assert final["result"]["plan"] == [
            {"product": STORAGE, "version": "1.1", "state": "rolled_back"},
            {"product": QUERY, "version": "1.1", "state": "failed"},
            {"product": PRIMARY, "version": "2.0", "state": "not_started"},
        ]
        assert final["result"]["failed_step"] == 2
        progress = _reports(redis_url, agent.PROGRESS_TASK, "21")
        texts = [report.get("plan_step") for report in progress]
        assert "step 2 of 3: downloading themis-query 1.1" in texts
        assert "step 1 of 3: rolling back themis-storage 1.1" in texts
        # The heartbeats after the job: every component on its old version.
        old = [{"product": p, "version": "1.0"} for p in (PRIMARY, STORAGE, QUERY)]
        assert procs.wait_until(lambda: _heartbeat_components(redis_url) == old, 10)
    finally:
        worker.stop()


def _heartbeat_components(redis_url: str) -> list[dict[str, str]] | None:
    newest = None
    # The queue's newest message is on the left (kombu pushes there).
    for raw in reversed(redis.Redis.from_url(redis_url).lrange(HEARTBEAT_QUEUE, 0, -1)):
        message = json.loads(raw)
        if message["headers"]["task"] == agent.HEARTBEAT_TASK:
            _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            newest = kwargs["envelope"]["payload"].get("components")
    return newest


def test_an_agent_killed_mid_plan_rolls_every_component_back_when_it_starts_again(
    node: PlanNode, broker: Celery, redis_url: str, tmp_path: Path
) -> None:
    """Killed (SIGKILL, by query's health check) after step 1 was applied and while
    step 2 was switched: the started agent puts every component back on 1.0 before it
    takes any work, and reports the job failed, interrupted and rolled back."""
    trees, files, versions = node.trees(), _files(node), _versions(node)
    killing = procs.unmeasured(_agent_env(node, redis_url, **{QUERY: "kill -9 $PPID"}))
    worker = procs.agent(NODE, killing, tmp_path)
    try:
        _send(broker, node, "22")
        died = procs.wait_until(lambda: not worker.alive, JOB_SECONDS)
        assert died, worker.output()[-4000:]
        assert worker.popen.returncode == -signal.SIGKILL
        assert _versions(node)[STORAGE] == "1.1"  # step 1 had taken effect
        assert (node.state_dir(QUERY) / JOURNAL_FILE).exists()  # step 2 half done
        assert (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
        assert not _finished(node, "22")

        worker = procs.respawn(worker, _agent_env(node, redis_url))
        done = procs.wait_until(lambda: _settled(node, "22"), JOB_SECONDS)
        assert done, worker.output()[-4000:]
        assert node.trees() == trees and _files(node) == files
        assert _versions(node) == versions
        assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
        for product in (PRIMARY, STORAGE, QUERY):
            assert not (node.state_dir(product) / JOURNAL_FILE).exists()
        got = procs.wait_until(lambda: bool(_reports(redis_url, agent.FINISHED_TASK, "22")), 10)
        assert got, worker.output()[-4000:]
        (final,) = _reports(redis_url, agent.FINISHED_TASK, "22")
        assert final["ok"] is False and final["error_code"] == agent.INTERRUPTED
        assert final["error_message"].startswith("interrupted; rolled back: ")
        assert [step["state"] for step in final["result"]["plan"]] == [
            "rolled_back",
            "rolled_back",
            "not_started",
        ]
        old = [{"product": p, "version": "1.0"} for p in (PRIMARY, STORAGE, QUERY)]
        assert procs.wait_until(lambda: _heartbeat_components(redis_url) == old, 10)

        # The job delivered again: its stored outcome, nothing applied.
        applied = _applies(node)
        _send(broker, node, "22")
        resent = procs.wait_until(
            lambda: len(_reports(redis_url, agent.FINISHED_TASK, "22")) == 2, JOB_SECONDS
        )
        assert resent, worker.output()[-4000:]
        assert _reports(redis_url, agent.FINISHED_TASK, "22")[1] == final
        assert _applies(node) == applied and _files(node) == files
    finally:
        worker.stop()
