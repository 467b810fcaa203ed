"""The agent's apply and rollback tasks, called in-process against a real engine
(real install and state dirs, real signed bundles). Only the broker is replaced:
`app.send_task`, the seam every report goes through, is recorded. Agents killed
mid-job are real processes killed by SIGKILL from their own hooks."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import signals

from tests import procs
from tests.agent.bundle_server import BundleServer
from tests.engine.apply_fixtures import snapshot
from tests.helpers import MakeBundle
from tests.procs import ROOT, wait_until
from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.commands import CommandType
from updates.engine.delta_bundle import create_delta_bundle
from updates.engine.journal import JOURNAL_FILE
from updates.engine.reports import HEARTBEAT_QUEUE
from updates.engine.state import load_state
from workers import agent
from workers.faults import FaultSpec
from workers.ledger import EntryState, JobKind, Ledger

pytestmark = pytest.mark.usefixtures("_no_faults")

KEY = bytes(range(32))


@pytest.fixture
def _no_faults() -> Iterator[None]:
    agent.install_faults(None)
    yield
    agent.install_faults(None)


@dataclass
class Node:
    env: dict[str, str]
    install: Path
    state: Path
    bundles: dict[str, Path]
    server: BundleServer
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> agent.AgentConfig:
        return agent.AgentConfig.from_env(self.env)

    def reports(self, job_id: str, task: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                kw
                for name, kw in self.sent
                if kw.get("job_id") == job_id and (task is None or name == task)
            ]

    def steps(self, job_id: str) -> list[str]:
        """The job's steps, byte progress of its download left out."""
        reports = self.reports(job_id, agent.PROGRESS_TASK)
        return [r["step"] for r in reports if r["step"] != "DOWNLOADING"]

    def finals(self, job_id: str) -> list[dict[str, Any]]:
        return self.reports(job_id, agent.FINISHED_TASK)

    def applies(self) -> list[dict[str, Any]]:
        path = self.state / agent.APPLIES_LOG
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def drains(self) -> list[dict[str, Any]]:
        path = self.state / agent.DRAIN_LOG
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def bundle_args(self, bundle: Path, version: str) -> dict[str, Any]:
        """An apply command's arguments for `bundle`, served by the node's bundle server."""
        return {
            "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
            "artifact_url": self.server.url(bundle),
            "download_token": "t",
            "version": version,
        }

    def full_args(self, version: str) -> dict[str, Any]:
        """The `full_*` arguments of a delta's command: the release's full bundle."""
        full = self.bundles[version]
        return {
            "full_artifact_url": self.server.url(full),
            "full_sha256": hashlib.sha256(full.read_bytes()).hexdigest(),
            "full_size": full.stat().st_size,
        }

    def apply_kwargs(self, job_id: str, version: str) -> dict[str, Any]:
        """The task's kwargs as the relay sends them: one signed envelope."""
        args = {**self.bundle_args(self.bundles[version], version), "health_timeout": 30}
        return {"envelope": signed_command(KEY, "n1", CommandType.APPLY, args, job_id=job_id)}

    def apply(self, job_id: str, version: str) -> None:
        agent.apply_release(**self.apply_kwargs(job_id, version))

    def rollback(self, job_id: str) -> None:
        envelope = signed_command(
            KEY, "n1", CommandType.ROLLBACK, {"point_id": None}, job_id=job_id
        )
        agent.rollback_node(envelope=envelope)


def _content(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a report says (inside its signed envelope)."""
    return dict(kwargs["envelope"]["payload"])


@pytest.fixture
def node(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_bundle: MakeBundle,
    test_pki: Any,
    bundle_server: BundleServer,
) -> Node:
    install, state = tmp_path / "install", tmp_path / "state"
    bundles = {
        v: make_bundle(v, files={"bin/themisd": f"#!/bin/sh\necho {v}\n".encode()})
        for v in ("1.0", "1.1")
    }
    engine.apply_bundle(bundles["1.0"], target=install, state_dir=state, trust_anchor=test_pki.root)
    env = {
        "THEMIS_NODE_ID": "n1",
        "THEMIS_INSTALL_DIR": str(install),
        "THEMIS_STATE_DIR": str(state),
        "THEMIS_TRUST_ANCHOR": str(test_pki.root),
        "THEMIS_HEARTBEAT_SECONDS": "60",
        "THEMIS_DRAIN_CMD": "true",
        "THEMIS_REJOIN_CMD": "true",
        "THEMIS_NODE_KEY": KEY.hex(),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("THEMIS_AGENT_FAULTS", raising=False)
    found = Node(env, install, state, bundles, bundle_server)

    def send_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
        assert queue == (HEARTBEAT_QUEUE if name == agent.HEARTBEAT_TASK else "dashboard")
        with found.lock:
            found.sent.append((name, _content(kwargs)))

    monkeypatch.setattr(app, "send_task", send_task)
    return found


def _installed(node: Node) -> str | None:
    return load_state(node.state).installed_version


def _kept_on_disk(node: Node, final: dict[str, Any]) -> bool:
    """Whether the job's final report is the one kept for the heartbeats to repeat."""
    kept = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
    return bool(kept == {k: v for k, v in final.items() if k != "node_id"})


def _run_killed_agent(node: Node, job_id: str, version: str, **env: str) -> int:
    """An agent process applying a job, killed (SIGKILL) by one of its hooks;
    its reports go to a file, as a broker would have received them."""
    code = (
        "import json, sys\n"
        "from themis_dashboard.celery import app\n"
        "out = open(sys.argv[1], 'a')\n"
        "def send_task(name, kwargs, queue):\n"
        "    out.write(json.dumps([name, kwargs]) + '\\n'); out.flush()\n"
        "app.send_task = send_task\n"
        "from workers import agent\n"
        "agent.apply_release(**json.loads(sys.argv[2]))\n"
    )
    sent_file = node.state.parent / f"killed-{job_id}.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(sent_file),
            json.dumps(node.apply_kwargs(job_id, version)),
        ],
        env={**procs.inherited_env(), **node.env, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    for line in sent_file.read_text().splitlines():
        name, kwargs = json.loads(line)
        node.sent.append((name, _content(kwargs)))
    return proc.returncode


def test_first_report_accepts_the_job_and_the_outcome_is_in_the_ledger(node: Node) -> None:
    node.apply("5", "1.1")
    assert node.steps("5")[0] == agent.ACCEPTED_STEP
    assert node.reports("5")[0]["percent"] == 1
    (final,) = node.finals("5")
    assert final["ok"] is True and final["result"]["version_to"] == "1.1"
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.state is EntryState.FINISHED
    assert entry.report is not None and entry.report["result"]["version_to"] == "1.1"
    assert [(a["job"], a["kind"]) for a in node.applies()] == [("5", "apply")]
    assert [(d["job"], d["event"]) for d in node.drains()] == [("5", "drain"), ("5", "rejoin")]
    assert node.drains()[0]["t"] <= node.drains()[1]["t"]
    assert _kept_on_disk(node, final)
    # Checked, drained, installed, rejoined: the steps the job's page shows, in order.
    steps = [(r["step"], r["percent"]) for r in node.reports("5", agent.PROGRESS_TASK)]
    named = [s for s in steps if s[0] in {"PREFLIGHT", "DRAINING", "REJOINING"}]
    assert named[:2] == [("PREFLIGHT", 2), ("DRAINING", 3)]
    assert steps[-1] == ("REJOINING", 95)
    # The download's share of the bar is 2 to 20 %, with its bytes.
    downloads = [r for r in node.reports("5", agent.PROGRESS_TASK) if r["step"] == "DOWNLOADING"]
    size = node.bundles["1.1"].stat().st_size
    assert downloads[-1]["percent"] == 20
    assert downloads[-1]["bytes_done"] == downloads[-1]["bytes_total"] == size
    assert all(2 <= r["percent"] <= 20 for r in downloads)


def test_a_finished_job_repeated_resends_its_final_report_and_applies_nothing(
    node: Node,
) -> None:
    node.apply("5", "1.1")
    tree = snapshot(node.install)
    (first,) = node.finals("5")
    node.apply("5", "1.1")
    second = node.finals("5")[1]
    assert second == first
    assert node.steps("5").count(agent.ACCEPTED_STEP) == 1
    assert len(node.applies()) == 1 and len(node.drains()) == 2
    assert snapshot(node.install) == tree and _installed(node) == "1.1"


def _cancel(job_id: str) -> None:
    agent.cancel_job(envelope=signed_command(KEY, "n1", CommandType.CANCEL, {}, job_id=job_id))


def test_a_cancel_before_the_apply_arrives_means_it_never_applies(node: Node) -> None:
    tree = snapshot(node.install)
    _cancel("9")
    (answer,) = node.finals("9")
    assert (answer["ok"], answer["error_code"]) == (False, agent.CANCELLED)
    entry = Ledger(node.state).get("9")
    assert entry is not None and entry.state is EntryState.FINISHED
    # The apply that was already queued arrives after the cancel: nothing is applied.
    node.apply("9", "1.1")
    assert node.finals("9") == [answer, answer]
    assert node.steps("9") == []
    assert node.applies() == [] and node.drains() == []
    assert snapshot(node.install) == tree and _installed(node) == "1.0"


def test_a_cancel_after_the_job_finished_answers_with_its_outcome(node: Node) -> None:
    node.apply("5", "1.1")
    (done,) = node.finals("5")
    _cancel("5")
    assert node.finals("5") == [done, done]
    assert done["ok"] is True and _installed(node) == "1.1"


def test_a_cancel_while_the_job_runs_is_too_late(node: Node) -> None:
    Ledger(node.state).claim("7", JobKind.APPLY, target_version="1.1", version_from="1.0")
    _cancel("7")
    assert node.steps("7") == [agent.IN_PROGRESS_STEP]
    assert node.finals("7") == []
    entry = Ledger(node.state).get("7")
    assert entry is not None and entry.state is EntryState.RUNNING
    Ledger(node.state).release("7")


def test_an_unsigned_cancel_is_refused_and_changes_nothing(node: Node) -> None:
    agent.cancel_job(envelope={"job_id": "9", "node_id": "n1"})
    assert node.reports("9") == [] and Ledger(node.state).get("9") is None


# Scenario 4: a redelivered apply while the first still runs is "in progress", never a failure
def test_duplicate_apply_while_the_first_runs_reports_in_progress(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = tmp_path / "go"
    # The health check waits for the test (bounded): the first apply holds the
    # engine lock in VERIFYING meanwhile.
    node.env["THEMIS_HEALTH_CMD"] = (
        f"i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    )
    monkeypatch.setenv("THEMIS_HEALTH_CMD", node.env["THEMIS_HEALTH_CMD"])
    first = threading.Thread(target=node.apply, args=("5", "1.1"))
    first.start()
    try:
        assert wait_until(lambda: "VERIFYING" in node.steps("5"), 30), node.sent
        node.apply("5", "1.1")  # the broker's redelivery
        assert node.finals("5") == []
        assert node.steps("5")[-1] == agent.IN_PROGRESS_STEP
        assert Ledger(node.state).active_job_id() == "5"
    finally:
        go.touch()
        first.join(60)
    (final,) = node.finals("5")
    assert final["ok"] is True and final["error_code"] == ""
    assert len(node.applies()) == 1 and _installed(node) == "1.1"
    assert [d["event"] for d in node.drains()] == ["drain", "rejoin"]  # one drain only


def _hold(node: Node, job_id: str | None) -> subprocess.Popen[str]:
    """Another agent process holding the engine lock (and owning `job_id` in
    the ledger when given) until its stdin closes."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from updates.engine.lock import NodeLock\n"
        "from workers.ledger import JobKind, Ledger\n"
        "state = Path(sys.argv[1])\n"
        "if sys.argv[2]:\n"
        "    Ledger(state).claim(sys.argv[2], JobKind.APPLY, target_version='1.1',"
        " version_from='1.0')\n"
        "NodeLock(state).acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(node.state), job_id or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# Scenario 4: the job runs in another live agent process holding the engine lock
def test_duplicate_apply_while_another_process_runs_it_reports_in_progress(node: Node) -> None:
    holder = _hold(node, "5")
    try:
        node.apply("5", "1.1")
        assert node.steps("5") == [agent.IN_PROGRESS_STEP] and node.finals("5") == []
        assert node.reports("5", agent.PROGRESS_TASK)[0]["percent"] == 0
        assert node.applies() == [] and node.drains() == []
    finally:
        holder.kill()
        holder.wait(30)
    # That process died with the job unfinished: the next delivery settles it.
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == agent.INTERRUPTED
    assert "version_to" not in final["result"] and final["result"]["installed_version"] == "1.0"
    assert node.applies() == [] and _installed(node) == "1.0"


def test_engine_busy_with_the_same_job_unknown_to_the_ledger_is_in_progress(node: Node) -> None:
    holder = _hold(node, None)
    try:
        node.apply("5", "1.1")
    finally:
        holder.kill()
        holder.wait(30)
    assert node.steps("5") == [agent.ACCEPTED_STEP, "PREFLIGHT", agent.IN_PROGRESS_STEP]
    assert node.finals("5") == [] and node.drains() == []  # never drained a busy node


def test_engine_busy_with_another_job_fails_this_one(node: Node) -> None:
    holder = _hold(node, "4")
    try:
        node.apply("5", "1.1")
    finally:
        holder.kill()
        holder.wait(30)
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == "ALREADY_IN_PROGRESS"
    assert _installed(node) == "1.0" and node.drains() == []
    assert _kept_on_disk(node, final)


# Scenario 5: the agent died after the engine committed; the redelivered command re-sends DONE
def test_agent_killed_after_commit_reports_done_at_start_and_on_redelivery(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    code = _run_killed_agent(node, "5", "1.1", THEMIS_REJOIN_CMD="kill -9 $PPID")
    assert code == -signal.SIGKILL
    assert _installed(node) == "1.1" and node.finals("5") == []
    assert agent.recover_at_start(node.config) == ["5"]
    assert "engine recovery at start" not in caplog.text  # it had nothing to do
    (done,) = node.finals("5")
    assert done["ok"] is True and done["result"] == {
        "ok": True,
        "version_from": "1.0",
        "version_to": "1.1",
        "recovered": None,  # the engine had committed: nothing to recover
        "settled_after_restart": True,
    }
    assert _kept_on_disk(node, done)
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.kind is JobKind.APPLY
    node.apply("5", "1.1")  # hours later, the visibility timeout redelivers it
    assert node.finals("5") == [done, done]
    assert [a["job"] for a in node.applies()] == ["5"]
    # killed in its rejoin, the node stayed drained: start-up rejoined it
    assert [(d["event"], d.get("ok")) for d in node.drains()] == [("drain", None), ("rejoin", True)]


def _left_running(node: Node, job_id: str, kind: JobKind, version_from: str) -> None:
    """A ledger entry RUNNING without a target version, as a dead agent's plan job leaves it."""
    ledger = Ledger(node.state)
    ledger.claim(job_id, kind, target_version=None, version_from=version_from)
    ledger.release(job_id)
    raw = json.loads(ledger.path(job_id).read_text())
    raw["owner"]["pid"], raw["owner"]["started"] = 2**22 + 7, 1.0
    ledger.path(job_id).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("version_from", "ok"), [("0.9", True), ("1.0", False)], ids=["changed", "unchanged"]
)
def test_a_job_left_running_without_a_target_is_done_when_the_version_changed(
    node: Node, version_from: str, ok: bool
) -> None:
    _left_running(node, "9", JobKind.APPLY, version_from)
    assert agent.recover_at_start(node.config) == ["9"]
    (final,) = node.finals("9")
    assert final["ok"] is ok
    if ok:
        assert final["result"]["version_to"] == "1.0"
    else:
        assert final["error_code"] == agent.INTERRUPTED
        assert final["error_message"] == (
            "the agent stopped during this apply and it did not take effect; after engine"
            " recovery (nothing to do) the node runs 1.0"
        )
        assert final["result"] == {
            "installed_version": "1.0",
            "version_from": "1.0",
            "recovered": None,
        }
    assert _kept_on_disk(node, final)


# Scenario 5: the same, redelivered to an agent that has not been through start-up
def test_agent_killed_after_commit_redelivery_alone_reports_done(node: Node) -> None:
    assert _run_killed_agent(node, "5", "1.1", THEMIS_REJOIN_CMD="kill -9 $PPID") != 0
    tree = snapshot(node.install)
    node.apply("5", "1.1")
    (done,) = node.finals("5")
    assert done["ok"] is True and done["error_code"] == "" and done["result"]["version_to"] == "1.1"
    assert len(node.applies()) == 1 and snapshot(node.install) == tree


# Scenario 12: an agent SIGKILLed mid-apply; start-up recovery makes the node whole and reports
def test_agent_killed_mid_apply_is_recovered_at_start_before_any_work(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    old_tree = snapshot(node.install)
    code = _run_killed_agent(node, "5", "1.1", THEMIS_HEALTH_CMD="kill -9 $PPID")
    assert code == -signal.SIGKILL
    assert (node.state / JOURNAL_FILE).exists()  # half-switched, journal pending
    assert snapshot(node.install) != old_tree
    # what a starting worker does (its queue is consumed only after this)
    signals.worker_ready.send(sender=None)
    try:
        assert "engine recovery at start: {'action': 'undone'" in caplog.text
        assert not (node.state / JOURNAL_FILE).exists()
        assert snapshot(node.install) == old_tree and _installed(node) == "1.0"
        (final,) = node.finals("5")
        assert final["ok"] is False and final["error_code"] == agent.INTERRUPTED
        assert final["result"]["installed_version"] == "1.0"
        assert final["result"]["recovered"]["action"] == "undone"
        assert final["error_message"] == (
            "the agent stopped during this apply and it did not take effect; after engine"
            " recovery (undone) the node runs 1.0"
        )
        assert "version_to" not in final["result"]
        entry = Ledger(node.state).get("5")
        assert entry is not None and entry.state is EntryState.FINISHED
        last = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
        assert last["job_id"] == "5" and last["error_code"] == agent.INTERRUPTED
    finally:
        signals.worker_shutdown.send(sender=None)
    node.apply("5", "1.1")  # redelivered: the stored outcome, nothing applied
    assert node.finals("5")[1] == final and len(node.applies()) == 1


def test_recovery_waits_while_another_process_holds_the_engine(node: Node) -> None:
    """An operator's CLI holds the engine at start: the job left running is reported in
    progress (numbered in the node's own sequence), kept RUNNING and not held by this
    process, and settled at the next start once the engine is free."""
    _left_running(node, "9", JobKind.APPLY, "1.0")
    sequence_file = node.state / agent.SEQUENCE_FILE
    holder = _hold(node, None)
    try:
        assert agent.recover_at_start(node.config) == ["9"]
    finally:
        holder.kill()
        holder.wait(30)
    (step,) = node.reports("9")
    assert (step["step"], step["percent"], step["node_id"]) == (agent.IN_PROGRESS_STEP, 0, "n1")
    assert json.loads(sequence_file.read_text())["seq"] > 0  # numbered in this node's sequence
    ledger = Ledger(node.state)
    entry = ledger.get("9")
    assert entry is not None and entry.state is EntryState.RUNNING
    assert ledger.active_job_id() is None  # let go: the next start takes it up
    assert agent.recover_at_start(node.config) == ["9"]
    (final,) = node.finals("9")
    assert (final["ok"], final["error_code"]) == (False, agent.INTERRUPTED)
    assert _kept_on_disk(node, final)


def test_an_unreadable_engine_journal_fails_the_jobs_left_running(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    _left_running(node, "9", JobKind.APPLY, "1.0")
    (node.state / JOURNAL_FILE).write_text("{not json")
    assert agent.recover_at_start(node.config) == ["9"]
    (final,) = node.finals("9")
    assert final["ok"] is False and "is unreadable" in final["error_message"]
    assert _kept_on_disk(node, final)
    entry = Ledger(node.state).get("9")
    assert entry is not None and entry.state is EntryState.FINISHED
    assert entry.report is not None and entry.report["error_message"] == final["error_message"]
    # Nothing of the node was touched: the journal stays for whoever looks at it.
    assert (node.state / JOURNAL_FILE).read_text() == "{not json"
    assert _installed(node) == "1.0"
    assert "engine recovery failed" in caplog.text


def test_rollback_is_idempotent_too(node: Node) -> None:
    node.apply("5", "1.1")
    node.rollback("6")
    (final,) = node.finals("6")
    assert final["ok"] is True and final["result"]["version_to"] == "1.0"
    assert node.steps("6")[0] == agent.ACCEPTED_STEP
    node.rollback("6")
    assert node.finals("6") == [final, final] and _installed(node) == "1.0"
    assert [(a["job"], a["kind"]) for a in node.applies()] == [("5", "apply"), ("6", "rollback")]
    entry = Ledger(node.state).get("6")
    assert entry is not None and entry.kind is JobKind.ROLLBACK and entry.target_version == "1.0"


def test_a_failed_verification_reports_its_checks_and_keeps_the_report(
    node: Node, make_bundle: MakeBundle
) -> None:
    failing = {"verify": {"smoke": [{"name": "answers", "cmd": "exit 1"}]}}
    node.bundles["1.1"] = make_bundle(
        "1.1", files={"bin/themisd": b"#!/bin/sh\necho 1.1\n"}, extra_manifest=failing
    )
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    assert final["error_code"] == "VERIFICATION_FAILED_ROLLED_BACK" and _installed(node) == "1.0"
    (check,) = final["result"]["verification"]
    assert (check["name"], check["ok"]) == ("answers", False)
    assert _kept_on_disk(node, final)


class _Unhealthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"not ready")

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_a_health_url_that_answers_an_error_rolls_the_apply_back(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unhealthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        node.env["THEMIS_HEALTH_URL"] = url
        monkeypatch.setenv("THEMIS_HEALTH_URL", url)
        node.apply("5", "1.1")
    finally:
        server.shutdown()
        server.server_close()
    (final,) = node.finals("5")
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK" and _installed(node) == "1.0"
    assert "503" in final["error_message"]


def test_a_failed_apply_rejoins_the_drained_node(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.env["THEMIS_HEALTH_CMD"] = "false"
    monkeypatch.setenv("THEMIS_HEALTH_CMD", "false")
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK" and _installed(node) == "1.0"
    assert [d["event"] for d in node.drains()] == ["drain", "rejoin"]
    # Rejoined, said so, and the ledger no longer counts the node drained.
    steps = [(r["step"], r["percent"]) for r in node.reports("5", agent.PROGRESS_TASK)]
    assert steps[-1] == ("REJOINING", 95)
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.drained is False


def test_a_job_id_that_is_not_plain_is_refused(node: Node) -> None:
    node.apply("../../etc", "1.1")
    assert node.sent == [] and _installed(node) == "1.0"
    assert not (node.state / "ledger").exists()


def test_heartbeat_carries_active_job_and_traffic_role(node: Node) -> None:
    beat = agent.collect_heartbeat(node.config)
    assert beat["active_job_id"] is None and beat["traffic_role"] == ""
    agent.set_traffic_role(
        envelope=signed_command(KEY, "n1", CommandType.TRAFFIC_ROLE, {"role": "standby"})
    )
    ledger = Ledger(node.state)
    ledger.claim("12", JobKind.APPLY, target_version="1.1", version_from="1.0")
    try:
        beat = agent.collect_heartbeat(node.config)
        assert beat["active_job_id"] == "12" and beat["traffic_role"] == "standby"
    finally:
        ledger.release("12")
    assert agent.collect_heartbeat(node.config)["active_job_id"] is None
    # the heartbeat sent after the role change carried it already
    assert node.sent[-1][0] == agent.HEARTBEAT_TASK


def test_a_heartbeat_on_demand_must_be_signed(node: Node) -> None:
    agent.heartbeat_now()
    agent.heartbeat_now(node_id="n1")
    agent.heartbeat_now(envelope=signed_command(KEY, "other", CommandType.HEARTBEAT, {}))
    assert node.sent == []
    agent.heartbeat_now(envelope=signed_command(KEY, "n1", CommandType.HEARTBEAT, {}))
    assert [name for name, _kw in node.sent] == [agent.HEARTBEAT_TASK]


def _deliveries(node: Node, count: int) -> list[str]:
    node.sent.clear()
    for n in range(count):
        agent.send_report(agent.PROGRESS_TASK, {"job_id": str(n), "step": "X"}, KEY)
    return [kw["job_id"] for _name, kw in node.sent]


def test_fault_hook_drops_and_duplicates_deterministically(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    assert _deliveries(node, 40) == [str(n) for n in range(40)]  # off: each once
    spec = FaultSpec.parse('{"seed": 7, "drop": 0.2, "duplicate": 0.2}')
    injector = agent.install_faults(spec)
    first = _deliveries(node, 40)
    assert injector is not None and injector.injected > 0
    agent.install_faults(spec)
    assert _deliveries(node, 40) == first  # the same seed replays the same faults
    counts = [first.count(str(n)) for n in range(40)]
    assert 0 in counts and 2 in counts and set(counts) <= {0, 1, 2}
    assert caplog.text.count("fault injected") == 2 * injector.injected
    agent.install_faults(FaultSpec.parse('{"seed": 8, "drop": 0.2, "duplicate": 0.2}'))
    assert _deliveries(node, 40) != first


@pytest.mark.parametrize(
    "value",
    ['{"seed": 7, "drop": 2}', "drop=0.1", '{"seed": "x"}', '{"lose": 0.1}', "[1]"],
)
def test_a_malformed_fault_spec_refuses_the_agent_at_start(
    node: Node, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("THEMIS_AGENT_FAULTS", value)
    with pytest.raises(RuntimeError, match="THEMIS_AGENT_FAULTS"):
        agent.AgentConfig.from_env()
    with pytest.raises(SystemExit, match="THEMIS_AGENT_FAULTS"):
        agent._check_config()  # the worker_init handler: stops the worker


ATTACKER_KEY = b"\x07" * 32  # another node's key, all an attacker on the broker holds


def _downgrade_args(node: Node, **extra: Any) -> dict[str, Any]:
    return {**node.bundle_args(node.bundles["1.0"], "1.0"), "allow_downgrade": True, **extra}


def _forged_applies(node: Node) -> dict[str, dict[str, Any]]:
    """Ways to order n1 back to 1.0 (a genuinely signed but older release)."""
    bundle = node.bundles["1.0"]
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    signed = signed_command(KEY, "n1", CommandType.APPLY, _downgrade_args(node), job_id="7")
    return {
        "unsigned, with allow_downgrade and a local bundle_path": {
            "job_id": "7",
            "node_id": "n1",
            "sha256": sha,
            "bundle_path": str(bundle),
            "allow_downgrade": True,
            "version": "1.0",
        },
        "signed with another node's key": {
            "envelope": signed_command(
                ATTACKER_KEY, "n1", CommandType.APPLY, _downgrade_args(node), job_id="7"
            )
        },
        "genuine envelope with bundle_path added beside it": {
            "envelope": signed,
            "bundle_path": str(bundle),
        },
        "bundle_path inside the signed arguments": {
            "envelope": signed_command(
                KEY,
                "n1",
                CommandType.APPLY,
                _downgrade_args(node, bundle_path=str(bundle)),
                job_id="7",
            )
        },
        "expired": {
            "envelope": signed_command(
                KEY, "n1", CommandType.APPLY, _downgrade_args(node), job_id="7", lifetime=-1
            )
        },
        "signed for another node": {
            "envelope": signed_command(
                KEY, "n2", CommandType.APPLY, _downgrade_args(node), job_id="7"
            )
        },
        "a rollback envelope sent as an apply": {
            "envelope": signed_command(
                KEY, "n1", CommandType.ROLLBACK, {"point_id": None}, job_id="7"
            )
        },
    }


FORGERIES = [
    "unsigned, with allow_downgrade and a local bundle_path",
    "signed with another node's key",
    "genuine envelope with bundle_path added beside it",
    "bundle_path inside the signed arguments",
    "expired",
    "signed for another node",
    "a rollback envelope sent as an apply",
]


# Scenario 1: a forged, unsigned or out-of-bounds apply cannot downgrade a node
@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_downgrade_is_refused_and_the_node_is_unchanged(node: Node, forgery: str) -> None:
    node.apply("5", "1.1")
    tree, sent = snapshot(node.install), len(node.sent)
    ledger_files = sorted(p.name for p in (node.state / "ledger").iterdir())
    agent.apply_release(**_forged_applies(node)[forgery])
    assert _installed(node) == "1.1" and snapshot(node.install) == tree
    assert len(node.sent) == sent  # nothing reported on any job
    assert sorted(p.name for p in (node.state / "ledger").iterdir()) == ledger_files
    assert [a["job"] for a in node.applies()] == ["5"]
    assert agent._take_refusals()[-1]["command"] == "apply"  # told in the next heartbeat


# Scenario 1: a captured genuine command replayed is refused before the ledger sees it
def test_replayed_command_is_refused(node: Node) -> None:
    node.apply("5", "1.1")
    rollback = signed_command(KEY, "n1", CommandType.ROLLBACK, {"point_id": None}, job_id="6")
    agent.rollback_node(envelope=rollback)
    assert _installed(node) == "1.0"
    node.apply("8", "1.1")
    sent = len(node.sent)
    agent.rollback_node(envelope=rollback)  # replayed: would re-send job 6's final report
    assert _installed(node) == "1.1" and len(node.sent) == sent
    assert "nonce" in agent._take_refusals()[-1]["reason"]


def test_a_resend_is_a_fresh_envelope_and_still_idempotent(node: Node) -> None:
    node.apply("5", "1.1")
    node.apply("5", "1.1")  # the relay's re-send: new nonce, same job
    assert len(node.finals("5")) == 2 and len(node.applies()) == 1


def test_allow_downgrade_signed_by_the_dashboard_is_honoured(node: Node) -> None:
    node.apply("5", "1.1")
    envelope = signed_command(KEY, "n1", CommandType.APPLY, _downgrade_args(node), job_id="9")
    agent.apply_release(envelope=envelope)
    assert _installed(node) == "1.0" and node.finals("9")[0]["ok"] is True


def test_a_rollback_is_claimed_for_the_version_its_point_restores(
    node: Node, make_bundle: MakeBundle, test_pki: Any
) -> None:
    node.apply("5", "1.1")  # a point back to 1.0
    engine.apply_bundle(
        make_bundle("1.2", files={"bin/themisd": b"#!/bin/sh\necho 1.2\n"}),
        target=node.install,
        state_dir=node.state,
        trust_anchor=test_pki.root,
    )  # and one back to 1.1
    *_, to_10, to_11 = engine.list_points(node.state)
    assert (to_10["version"], to_11["version"]) == ("1.0", "1.1")
    ledger = Ledger(node.state)
    # No point named: the newest point that leads away from the installed 1.2.
    node.rollback("6")
    entry = ledger.get("6")
    assert entry is not None and entry.target_version == "1.1"
    assert _installed(node) == "1.1"
    # Again: now the point that leads away from 1.1, not the newest one.
    node.rollback("7")
    entry = ledger.get("7")
    assert entry is not None and entry.target_version == "1.0"
    assert _installed(node) == "1.0"
    # A point named by its id: the version it restores, whatever is installed.
    args = {"point_id": to_11["id"]}
    agent.rollback_node(envelope=signed_command(KEY, "n1", CommandType.ROLLBACK, args, job_id="8"))
    entry = ledger.get("8")
    assert entry is not None and entry.target_version == "1.1"


def test_a_bundle_whose_size_is_not_the_releases_is_refused_before_it_is_read(
    node: Node,
) -> None:
    bundle = node.bundles["1.1"]
    args = {**node.bundle_args(bundle, "1.1"), "size": bundle.stat().st_size + 1}
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5"))
    (final,) = node.finals("5")
    assert (final["ok"], final["error_code"]) == (False, "MANIFEST_INVALID")
    size = bundle.stat().st_size
    assert f"the server has {size} bytes, {size + 1} were expected" in final["error_message"]
    assert _installed(node) == "1.0" and list((node.state / "downloads").iterdir()) == []


# ------------------------------------------------------------------ failures on the way


def test_a_delta_that_cannot_be_downloaded_is_replaced_by_the_full_bundle(node: Node) -> None:
    full = node.bundles["1.1"]
    full_args = node.full_args("1.1")
    args = {
        "sha256": "cd" * 32,  # the delta's: never fetched, the server no longer has it
        "artifact_url": full_args["full_artifact_url"].rsplit("/", 1)[0]
        + "/themisdb-1.1-from-1.0.delta",
        "download_token": "t",
        "version": "1.1",
        **full_args,
    }
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5"))
    (final,) = node.finals("5")
    assert final["ok"] is True and final["result"]["version_to"] == "1.1"
    assert _installed(node) == "1.1"
    downloads = [r for r in node.reports("5", agent.PROGRESS_TASK) if r["step"] == "DOWNLOADING"]
    assert downloads[-1]["bytes_done"] == downloads[-1]["bytes_total"] == full.stat().st_size
    assert list((node.state / "downloads").iterdir()) == []  # nothing left behind


def _delta_from_10(node: Node, tmp_path: Path, test_pki: Any) -> Path:
    """A delta bundle of 1.1 against 1.0's files: bin/themisd ships as a patch."""
    old, new = tmp_path / "delta-old", tmp_path / "delta-new"
    for tree, version in ((old, "1.0"), (new, "1.1")):
        (tree / "bin").mkdir(parents=True)
        (tree / "bin/themisd").write_bytes(f"#!/bin/sh\necho {version}\n".encode())
        (tree / "bin/themisd").chmod(0o755)
    out = tmp_path / "themisdb-1.1-from-1.0.delta"
    result = create_delta_bundle(
        old, new, out, product="themisdb", version="1.1", key_path=test_pki.leaf.key,
        cert_path=test_pki.leaf.cert, chain_path=test_pki.chain, min_saving=-100.0,
    )  # fmt: skip
    assert result.delta_paths == ["bin/themisd"]
    return out


def _delta_args(node: Node, delta: Path) -> dict[str, Any]:
    return {**node.bundle_args(delta, "1.1"), **node.full_args("1.1")}


def _apply_delta_over_an_edited_base(
    node: Node, tmp_path: Path, test_pki: Any, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Someone edited the installed binary, so the patch's base is not on this node any
    more; then the delta comes. Returns the command's arguments and the job's final report."""
    delta = _delta_from_10(node, tmp_path, test_pki)
    (node.install / "bin/themisd").write_bytes(EDITED)
    args = {**_delta_args(node, delta), **overrides}
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5"))
    (final,) = node.finals("5")
    return args, final


EDITED = b"#!/bin/sh\necho edited\n"


def test_a_file_whose_base_changed_on_the_node_comes_from_the_full_bundle(
    node: Node, tmp_path: Path, test_pki: Any
) -> None:
    _, final = _apply_delta_over_an_edited_base(node, tmp_path, test_pki)
    assert final["ok"] is True and final["result"]["version_to"] == "1.1", final
    assert final["result"]["files_fallback"] == ["bin/themisd"]
    assert (node.install / "bin/themisd").read_bytes() == b"#!/bin/sh\necho 1.1\n"
    # The full bundle was fetched for it and nothing of it is left behind.
    assert list((node.state / "downloads").iterdir()) == []
    assert not (node.state / "delta-fallback").exists() or not any(
        (node.state / "delta-fallback").iterdir()
    )


def test_a_full_bundle_whose_size_is_not_the_releases_fails_the_fallback(
    node: Node, tmp_path: Path, test_pki: Any
) -> None:
    size = node.bundles["1.1"].stat().st_size + 1
    _, final = _apply_delta_over_an_edited_base(node, tmp_path, test_pki, full_size=size)
    assert final["ok"] is False
    assert f"server has {size - 1} bytes, the release has {size}" in final["error_message"]
    assert (node.install / "bin/themisd").read_bytes() == EDITED
    assert _installed(node) == "1.0" and list((node.state / "downloads").iterdir()) == []


def test_a_delta_over_its_own_base_never_fetches_the_full_bundle(
    node: Node, tmp_path: Path, test_pki: Any
) -> None:
    delta = _delta_from_10(node, tmp_path, test_pki)
    args = {**_delta_args(node, delta), "full_artifact_url": node.server.url(delta) + ".gone"}
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="6"))
    (final,) = node.finals("6")
    assert final["ok"] is True and final["result"]["files_fallback"] == []
    assert (node.install / "bin/themisd").read_bytes() == b"#!/bin/sh\necho 1.1\n"


def test_a_delta_refused_without_a_full_bundle_fails_the_job(node: Node) -> None:
    url = node.server.url(node.bundles["1.1"]).rsplit("/", 1)[0] + "/gone.delta"
    args = {"sha256": "cd" * 32, "artifact_url": url, "download_token": "t", "version": "1.1"}
    agent.apply_release(envelope=signed_command(KEY, "n1", CommandType.APPLY, args, job_id="5"))
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == "DOWNLOAD_REFUSED"
    assert "HTTP 404" in final["error_message"]
    assert _installed(node) == "1.0" and node.applies() == [] and node.drains() == []


def test_a_failing_rejoin_after_the_update_fails_the_job(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update is in place, but the node did not rejoin its cluster: the job is not a
    success, and the report names the rejoin command and what it printed."""
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "echo 'raft: no quorum' >&2; exit 3")
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == "HOOK_FAILED"
    assert final["error_message"] == "rejoin command failed (3): raft: no quorum"
    assert _installed(node) == "1.1"  # the engine committed before the rejoin
    assert [(d["event"], d.get("ok")) for d in node.drains()] == [
        ("drain", None),
        ("rejoin", False),
    ]
    assert node.steps("5")[-1] == "REJOINING"
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.state is EntryState.FINISHED and not entry.drained


def test_a_failing_rejoin_after_a_failed_apply_reports_the_apply_failure(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_HEALTH_CMD", "false")
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "exit 4")
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    # The job's own outcome is reported; the failed rejoin is only logged.
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
    assert _installed(node) == "1.0"
    assert [(d["event"], d.get("ok")) for d in node.drains()] == [
        ("drain", None),
        ("rejoin", False),
    ]
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.state is EntryState.FINISHED and not entry.drained


def test_a_failing_drain_applies_nothing_and_rejoins_the_node(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_DRAIN_CMD", "echo 'still leader' >&2; exit 2")
    node.apply("5", "1.1")
    (final,) = node.finals("5")
    assert final["error_code"] == "HOOK_FAILED"
    assert final["error_message"] == "drain command failed (2): still leader"
    assert _installed(node) == "1.0" and node.applies() == []
    # a drain that failed half way may have left the node out: it is asked to rejoin
    assert [d["event"] for d in node.drains()] == ["drain", "rejoin"]


def test_a_rollback_from_a_corrupt_restore_point_fails_and_changes_nothing(node: Node) -> None:
    node.apply("5", "1.1")
    tree = snapshot(node.install)
    for blob in (node.state / "points").glob("*/blobs/*"):
        subprocess.run(["chattr", "-i", str(blob)], check=False)
        blob.unlink()
        blob.write_bytes(b"bit rot")
    node.rollback("6")
    (final,) = node.finals("6")
    assert final["ok"] is False and final["error_code"] == "RESTORE_POINT_CORRUPT"
    assert "SHA-256" in final["error_message"]
    assert _installed(node) == "1.1" and snapshot(node.install) == tree
    entry = Ledger(node.state).get("6")
    assert entry is not None and entry.state is EntryState.FINISHED
    assert entry.report is not None and entry.report["error_code"] == "RESTORE_POINT_CORRUPT"
    node.rollback("6")  # redelivered: the stored failure again, nothing tried twice
    assert node.finals("6") == [final, final]
    assert [a["job"] for a in node.applies()] == ["5", "6"]


def test_a_rollback_with_no_point_to_go_back_to_fails(node: Node) -> None:
    envelope = signed_command(
        KEY, "n1", CommandType.ROLLBACK, {"point_id": "no-such-point"}, job_id="6"
    )
    agent.rollback_node(envelope=envelope)
    (final,) = node.finals("6")
    assert final["ok"] is False and final["error_code"] == "USAGE"
    assert "no restore point 'no-such-point'" in final["error_message"]
    assert _installed(node) == "1.0"


def _rollback_of(job_id: str) -> dict[str, Any]:
    return {
        "envelope": signed_command(
            KEY, "n1", CommandType.ROLLBACK, {"point_id": None}, job_id=job_id
        )
    }


def test_a_rollback_while_another_job_holds_the_engine_fails(node: Node) -> None:
    node.apply("5", "1.1")
    holder = _hold(node, "4")
    try:
        agent.rollback_node(**_rollback_of("6"))
    finally:
        holder.kill()
        holder.wait(30)
    (final,) = node.finals("6")
    assert final["ok"] is False and final["error_code"] == "ALREADY_IN_PROGRESS"
    assert _installed(node) == "1.1"


def test_a_rollback_whose_own_delivery_holds_the_engine_is_in_progress(node: Node) -> None:
    node.apply("5", "1.1")
    holder = _hold(node, None)  # this very job, run by a delivery the ledger lost
    try:
        agent.rollback_node(**_rollback_of("6"))
    finally:
        holder.kill()
        holder.wait(30)
    assert node.steps("6") == [agent.ACCEPTED_STEP, "RESTORE_POINT", agent.IN_PROGRESS_STEP]
    assert node.finals("6") == [] and _installed(node) == "1.1"


def test_start_up_recovery_waits_while_someone_else_holds_the_node(node: Node) -> None:
    """A job a dead agent left running, and an operator's CLI holding the engine lock:
    the outcome is decided later (reported in progress), not guessed now."""
    dead = _hold(node, "5")
    dead.kill()
    dead.wait(30)
    operator = _hold(node, None)
    try:
        assert agent.recover_at_start(node.config) == ["5"]
    finally:
        operator.kill()
        operator.wait(30)
    assert node.steps("5") == [agent.IN_PROGRESS_STEP] and node.finals("5") == []
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.state is EntryState.RUNNING
    assert not Ledger(node.state).owner_alive(entry)  # let go: the next start decides
    assert agent.recover_at_start(node.config) == ["5"]
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == agent.INTERRUPTED
    assert final["result"]["installed_version"] == "1.0"


def test_start_up_recovery_that_fails_reports_the_interrupted_job_failed(node: Node) -> None:
    """Killed mid-apply, and the restore point recovery needs is corrupt: nothing is
    restored from bad bytes; the job ends failed with the engine's code and the journal
    stays for an operator."""
    code = _run_killed_agent(node, "5", "1.1", THEMIS_HEALTH_CMD="kill -9 $PPID")
    assert code == -signal.SIGKILL
    for blob in (node.state / "points").glob("*/blobs/*"):
        subprocess.run(["chattr", "-i", str(blob)], check=False)
        blob.unlink()
        blob.write_bytes(b"bit rot")
    half_switched = snapshot(node.install)
    assert agent.recover_at_start(node.config) == ["5"]
    (final,) = node.finals("5")
    assert final["ok"] is False and final["error_code"] == "RESTORE_POINT_CORRUPT"
    assert snapshot(node.install) == half_switched
    assert (node.state / JOURNAL_FILE).exists()
    entry = Ledger(node.state).get("5")
    assert entry is not None and entry.state is EntryState.FINISHED
