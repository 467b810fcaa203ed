"""The agent's contract task and the schema in its heartbeat, called in-process against a
real engine on tmp dirs (a real SQLite node database, real signed bundles carrying
migrations). Only the broker is replaced: `app.send_task` is recorded."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MakeBundle
from tests.security.signing import signed_command
from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.commands import CommandType
from updates.engine.errors import EngineError
from updates.engine.lock import NodeLock, read_holder
from updates.engine.reports import HEARTBEAT_QUEUE
from updates.engine.schema import DATABASE_URL_ENV, schema_status
from workers import agent
from workers.ledger import EntryState, JobKind, Ledger

KEY = bytes(range(32))
NODE = "n1"
MIGRATIONS: dict[str, dict[str, Any]] = {
    "0001": {
        "version": "0001",
        "phase": "expand",
        "description": "orders get a status",
        "operations": [
            {
                "op": "add_column",
                "table": "orders",
                "column": "status",
                "type": "TEXT",
                "nullable": True,
                "default": "new",
            }
        ],
    },
    "0002": {
        "version": "0002",
        "phase": "contract",
        "description": "the legacy note is read by no release any more",
        "operations": [
            {"op": "drop_column", "table": "orders", "column": "legacy_note", "grace_seconds": 3600}
        ],
    },
}


@dataclass
class Node:
    install: Path
    state: Path
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def config(self) -> agent.AgentConfig:
        return agent.AgentConfig.from_env()

    @property
    def database(self) -> Path:
        return self.state / "data" / "themis.db"

    def columns(self) -> list[str]:
        with sqlite3.connect(self.database) as conn:
            return [row[1] for row in conn.execute("PRAGMA table_info(orders)")]

    def finals(self, job_id: str) -> list[dict[str, Any]]:
        return [
            kw for name, kw in self.sent if name == agent.FINISHED_TASK and kw["job_id"] == job_id
        ]

    def steps(self, job_id: str) -> list[str]:
        return [
            kw["step"]
            for name, kw in self.sent
            if name == agent.PROGRESS_TASK and kw["job_id"] == job_id
        ]

    def contract(self, job_id: str, version: str = "1.1") -> None:
        envelope = signed_command(
            KEY, NODE, CommandType.CONTRACT, {"version": version}, job_id=job_id
        )
        agent.contract_schema(envelope=envelope)

    def contracts_run(self) -> int:
        path = self.state / agent.APPLIES_LOG
        if not path.exists():
            return 0
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return sum(line["kind"] == "contract" for line in lines)


def _env(node: Node) -> dict[str, str]:
    return {
        "THEMIS_NODE_ID": NODE,
        "THEMIS_INSTALL_DIR": str(node.install),
        "THEMIS_STATE_DIR": str(node.state),
        "THEMIS_NODE_KEY": KEY.hex(),
    }


def _release(version: str, *, migrations: bool) -> dict[str, bytes]:
    files = {"bin/themisd": f"#!/bin/sh\necho {version}\n".encode()}
    if migrations:
        for name, body in MIGRATIONS.items():
            files[f"migrations/{name}.json"] = json.dumps(body).encode()
    return files


@pytest.fixture
def node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_bundle: MakeBundle, test_pki: Any
) -> Node:
    """A node on 1.1 (whose apply ran expand 0001) over a database the service made on 1.0."""
    install, state = tmp_path / "install", tmp_path / "state"
    found = Node(install, state)
    engine.apply_bundle(
        make_bundle("1.0", files=_release("1.0", migrations=False)),
        target=install,
        state_dir=state,
        trust_anchor=test_pki.root,
    )
    found.database.parent.mkdir(parents=True)
    with sqlite3.connect(found.database) as conn:
        conn.execute(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, legacy_note TEXT)"
        )
        conn.executemany(
            "INSERT INTO orders (customer, legacy_note) VALUES (?, ?)",
            [(f"c{i}", f"note {i}") for i in range(20)],
        )
    refs = [{"version": v, "phase": m["phase"]} for v, m in MIGRATIONS.items()]
    engine.apply_bundle(
        make_bundle(
            "1.1", files=_release("1.1", migrations=True), extra_manifest={"migrations": refs}
        ),
        target=install,
        state_dir=state,
        trust_anchor=test_pki.root,
    )
    env = {
        "THEMIS_NODE_ID": NODE,
        "THEMIS_INSTALL_DIR": str(install),
        "THEMIS_STATE_DIR": str(state),
        "THEMIS_TRUST_ANCHOR": str(test_pki.root),
        "THEMIS_HEARTBEAT_SECONDS": "60",
        "THEMIS_NODE_KEY": KEY.hex(),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.delenv("THEMIS_AGENT_FAULTS", raising=False)
    agent.install_faults(None)

    def send_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
        assert queue == (HEARTBEAT_QUEUE if name == agent.HEARTBEAT_TASK else "dashboard")
        found.sent.append((name, dict(kwargs["envelope"]["payload"])))

    monkeypatch.setattr(app, "send_task", send_task)
    return found


def test_the_apply_ran_expand_and_left_the_contract(node: Node) -> None:
    columns = node.columns()
    assert "status" in columns and "legacy_note" in columns


def test_a_contract_job_hides_the_dropped_column_and_reports_its_end(node: Node) -> None:
    node.contract("41")
    assert node.steps("41")[:2] == [agent.ACCEPTED_STEP, "CONTRACTING"]
    (final,) = node.finals("41")
    assert final["ok"] is True, final
    assert final["result"]["schema_version"] == "0002"
    assert final["result"]["version"] == "1.1"
    assert [r["version"] for r in final["result"]["applied"]] == ["0002"]
    assert final["result"]["dropped"] == []  # the grace period is an hour
    columns = node.columns()
    assert "status" in columns and "legacy_note" not in columns
    assert any(c.startswith("_themis_dropped") for c in columns)  # hidden, data kept
    entry = Ledger(node.state).get("41")
    assert entry is not None and entry.state is EntryState.FINISHED
    assert entry.kind is JobKind.CONTRACT
    assert node.contracts_run() == 1
    last = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
    assert (last["job_id"], last["ok"], last["result"]) == ("41", True, final["result"])
    # The heartbeat after the job says so.
    beat = [kw for name, kw in node.sent if name == agent.HEARTBEAT_TASK][-1]
    assert beat["schema"]["version"] == "0002"
    assert [h["version"] for h in beat["schema"]["history"]][-1] == "0002"


def test_a_repeated_contract_command_resends_the_report_and_runs_nothing(node: Node) -> None:
    node.contract("41")
    node.contract("41")
    first, second = node.finals("41")
    assert first == second
    assert node.contracts_run() == 1


def test_a_second_contract_job_is_a_no_op_with_the_same_schema(node: Node) -> None:
    node.contract("41")
    node.contract("42")
    (final,) = node.finals("42")
    assert final["ok"] is True and final["result"]["schema_version"] == "0002"
    assert [r["outcome"] for r in final["result"]["applied"]] in ([], ["already_applied"])


def test_a_contract_for_another_release_is_refused_and_changes_nothing(node: Node) -> None:
    node.contract("43", version="1.2")
    (final,) = node.finals("43")
    assert (final["ok"], final["error_code"]) == (False, "CONTRACT_REFUSED")
    assert final["error_message"] == (
        "this node runs 1.1, not 1.2: its contract migrations are not run"
    )
    assert final["result"] == {"installed_version": "1.1"}
    assert "legacy_note" in node.columns()
    assert node.contracts_run() == 0
    # Kept on disk for the heartbeats, in case this report is lost.
    last = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
    assert (last["job_id"], last["error_code"]) == ("43", "CONTRACT_REFUSED")
    entry = Ledger(node.state).get("43")
    assert entry is not None and entry.state is EntryState.FINISHED


def test_a_contract_resumed_without_its_version_is_refused_naming_none(node: Node) -> None:
    # A ledger entry that lost its version (written by an older agent): the job is not run.
    ledger = Ledger(node.state)
    ledger.claim("47", JobKind.CONTRACT, target_version=None, version_from="1.1")
    ledger.release("47")
    raw = json.loads(ledger.path("47").read_text())
    raw["owner"]["pid"], raw["owner"]["started"] = 2**22 + 7, 1.0
    ledger.path("47").write_text(json.dumps(raw))
    assert agent.recover_at_start(node.config) == ["47"]
    (final,) = node.finals("47")
    assert final["error_message"] == (
        "this node runs 1.1, not (none named): its contract migrations are not run"
    )
    assert "legacy_note" in node.columns()


def test_a_contract_on_a_node_with_no_release_names_none(node: Node, tmp_path: Path) -> None:
    config = agent.AgentConfig.from_env({**_env(node), "THEMIS_STATE_DIR": str(tmp_path / "bare")})
    reporter = agent.JobReporter("48", NODE, KEY, ledger=Ledger(config.state_dir))
    agent.run_contract_job(config, reporter, "1.1")
    (final,) = node.finals("48")
    assert final["error_message"] == (
        "this node runs no release, not 1.1: its contract migrations are not run"
    )
    assert final["result"] == {"installed_version": None}


@pytest.mark.parametrize(
    "args", [{}, {"version": ""}, {"version": 11}, {"version": "1.1", "sql": "DROP TABLE orders"}]
)
def test_a_contract_command_without_its_version_is_refused_unreported(
    node: Node, args: dict[str, Any]
) -> None:
    envelope = signed_command(KEY, NODE, CommandType.CONTRACT, args, job_id="44")
    agent.contract_schema(envelope=envelope)
    assert not node.finals("44") and not node.steps("44")
    assert "legacy_note" in node.columns()


def test_an_unsigned_contract_is_refused(node: Node) -> None:
    agent.contract_schema(job_id="45", version="1.1")
    assert not node.sent and "legacy_note" in node.columns()


def test_an_interrupted_contract_runs_again_at_start(node: Node) -> None:
    ledger = Ledger(node.state)
    claim = ledger.claim("46", JobKind.CONTRACT, target_version="1.1", version_from="1.1")
    ledger.release("46")  # as if its agent died with it RUNNING
    assert claim.entry.owner is not None
    # The entry names this process; a pid of a process that is gone is what a dead agent left.
    raw = json.loads(ledger.path("46").read_text())
    raw["owner"]["pid"], raw["owner"]["started"] = 2**22 + 7, 1.0
    ledger.path("46").write_text(json.dumps(raw))
    assert agent.recover_at_start(node.config) == ["46"]
    (final,) = node.finals("46")
    assert final["ok"] is True and final["result"]["schema_version"] == "0002"
    assert "legacy_note" not in node.columns()


def test_the_heartbeat_carries_the_schema_only_when_the_database_exists(
    node: Node, tmp_path: Path
) -> None:
    beat = agent.collect_heartbeat(node.config)
    assert beat["schema"]["version"] == "0001"
    (entry,) = beat["schema"]["history"]
    assert (entry["version"], entry["phase"], entry["outcome"]) == ("0001", "expand", "applied")
    assert entry["started"] and entry["duration_ms"] >= 0
    other = agent.AgentConfig.from_env(
        {"THEMIS_NODE_ID": "n2", "THEMIS_STATE_DIR": str(tmp_path / "empty")}
    )
    assert "schema" not in agent.collect_heartbeat(other)
    assert not (tmp_path / "empty" / "data").exists()  # nothing was created to look


def test_the_heartbeat_reads_the_schema_again_only_when_the_database_changed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real_status = schema_status

    def counted(state_dir: Path) -> dict[str, Any]:
        reads.append(state_dir)
        return real_status(state_dir)

    monkeypatch.setattr(agent, "schema_status", counted)
    monkeypatch.setattr(agent, "_schema_cache", {})
    first = agent.collect_heartbeat(node.config)["schema"]
    assert agent.collect_heartbeat(node.config)["schema"] == first
    assert reads == [node.state]  # the second beat: from the cache
    node.contract("66")
    after = agent.collect_heartbeat(node.config)["schema"]
    assert len(reads) == 2 and after["version"] == "0002" != first["version"]


def test_a_broken_database_never_fails_the_heartbeat(tmp_path: Path) -> None:
    state = tmp_path / "broken"
    (state / "data").mkdir(parents=True)
    (state / "data" / "themis.db").write_bytes(b"this is not a database" * 100)
    config = agent.AgentConfig.from_env({"THEMIS_NODE_ID": "n3", "THEMIS_STATE_DIR": str(state)})
    beat = agent.collect_heartbeat(config)
    assert beat["node_id"] == "n3" and "schema" not in beat


def test_the_schema_summary_fits_the_dashboards_limits() -> None:
    status = {
        "schema_version": "7" * 100,
        "history": [
            {"version": str(i), "phase": "expand", "outcome": "applied", "duration_ms": i}
            for i in range(30)
        ]
        + [
            {"version": "x", "phase": "sideways", "outcome": "o" * 99, "started_at": "t" * 99},
            {"phase": "expand"},
            "junk",
        ],
    }
    summary = agent.schema_summary(status)
    assert summary["version"] == "7" * 64
    assert len(summary["history"]) <= agent.SCHEMA_HISTORY_ENTRIES
    last = summary["history"][-1]
    assert (last["phase"], len(last["outcome"]), len(last["started"])) == ("", 32, 64)


def test_the_schema_summary_keeps_the_newest_entries_in_order_and_blanks_what_is_missing() -> None:
    history: list[Any] = [
        {"version": f"{i:04d}", "phase": "contract" if i % 2 else "expand", "outcome": "applied"}
        for i in range(1, 12)
    ]
    # Entries without a version in the middle are passed over, not the end of the list.
    history[-4:-4] = [{"phase": "expand"}, "junk"]
    history.append({"version": "0012", "duration_ms": 5.5, "started_at": "2026-12-01T10:00:00Z"})
    summary = agent.schema_summary({"schema_version": "0012", "history": history})
    assert summary["version"] == "0012"
    versions = [entry["version"] for entry in summary["history"]]
    # The last ten entries, of which the eight with a version.
    assert versions == ["0005", "0006", "0007", "0008", "0009", "0010", "0011", "0012"]
    assert summary["history"][0] == {
        "version": "0005",
        "phase": "contract",
        "outcome": "applied",
        "started": "",
        "duration_ms": None,
    }
    assert summary["history"][1]["phase"] == "expand"
    assert summary["history"][-1] == {
        "version": "0012",
        "phase": "",
        "outcome": "",
        "started": "2026-12-01T10:00:00Z",
        "duration_ms": 5.5,
    }
    long = agent.schema_summary({"schema_version": None, "history": [{"version": "v" * 70}]})
    assert long == {"version": "", "history": [{**long["history"][0], "version": "v" * 64}]}
    assert agent.schema_summary({"history": "not a list"}) == {"version": "", "history": []}
    assert agent.schema_summary({"history": {"version": "0001"}}) == {"version": "", "history": []}


def test_a_contract_while_another_job_holds_the_engine_fails_naming_it(node: Node) -> None:
    ledger = Ledger(node.state)
    ledger.claim("60", JobKind.APPLY, target_version="1.2", version_from="1.1")
    with NodeLock(node.state, command="apply"):
        node.contract("61")
    (final,) = node.finals("61")
    assert (final["ok"], final["error_code"]) == (False, "ALREADY_IN_PROGRESS")
    assert "apply" in final["error_message"]
    assert "legacy_note" in node.columns()
    kept = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
    assert (kept["job_id"], kept["error_code"]) == ("61", "ALREADY_IN_PROGRESS")


def test_a_contract_whose_engine_lock_no_job_accounts_for_is_in_progress(node: Node) -> None:
    # The lock is held but no other running job holds it: this very job, whose ledger entry
    # was lost, is under way. Said so, and no final report.
    with NodeLock(node.state, command="contract"):
        node.contract("62")
    assert node.steps("62")[-1] == agent.IN_PROGRESS_STEP
    (in_progress,) = [kw for name, kw in node.sent if kw.get("step") == agent.IN_PROGRESS_STEP]
    assert in_progress["percent"] == 0
    assert node.finals("62") == []


def test_a_contract_the_engine_fails_reports_its_code_and_keeps_the_report(node: Node) -> None:
    with sqlite3.connect(node.database) as conn:
        conn.execute("DROP TABLE orders")  # the column to drop is gone with its table
    node.contract("63")
    assert node.steps("63")[:2] == [agent.ACCEPTED_STEP, "CONTRACTING"]
    contracting = [
        kw["percent"]
        for name, kw in node.sent
        if name == agent.PROGRESS_TASK and kw["step"] == "CONTRACTING"
    ]
    assert contracting == [10]
    (final,) = node.finals("63")
    assert final["ok"] is False and final["error_code"] not in ("", "UNEXPECTED")
    assert final["result"] == {}  # a migration's failure carries no details
    kept = json.loads((node.state / agent.LAST_JOB_FILE).read_text())
    assert (kept["job_id"], kept["error_code"]) == ("63", final["error_code"])
    # Each engine run is logged with its job.
    lines = (node.state / agent.APPLIES_LOG).read_text().splitlines()
    assert json.loads(lines[-1])["job"] == "63"


def test_a_contract_failure_s_details_are_its_result(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(install_dir: Path, state_dir: Path) -> dict[str, Any]:
        err = EngineError("not enough space for the migration's copy")
        err.details = {"needed_bytes": 10, "free_bytes": 3}
        raise err

    monkeypatch.setattr(agent, "run_contract", no_space)
    node.contract("64")
    (final,) = node.finals("64")
    assert final["result"] == {"needed_bytes": 10, "free_bytes": 3}
    assert final["error_code"] == EngineError.code


def test_the_contract_holds_the_engine_lock_as_a_contract(node: Node) -> None:
    node.contract("65")
    (final,) = node.finals("65")
    assert final["ok"] is True
    assert read_holder(node.state)["command"] == "contract"  # what a refused apply names
