"""Multi-component nodes in the agent, in this process: THEMIS_COMPONENTS, the heartbeat's
components, a plan applied in order, refused before anything is written (malformed,
unknown product, unmet dependency), a failed step undoing the steps before it, and a
plan cut short by a killed agent undone at start. Reports are captured where the broker
would take them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.agent.bundle_server import BundleServer
from tests.agent.plan_fixtures import (
    PRIMARY,
    QUERY,
    STORAGE,
    PlanNode,
    new_plan_node,
    upgrade_steps,
)
from themis_dashboard.celery import app
from updates.engine import apply as engine
from updates.engine.devpki import Pki
from updates.engine.journal import JOURNAL_FILE
from updates.engine.manifest import Dependency
from updates.engine.reports import HEARTBEAT_QUEUE
from updates.engine.state import load_state
from workers import agent
from workers.components import Component
from workers.ledger import EntryState, JobKind, Ledger
from workers.plan import JOURNAL_FILE as PLAN_JOURNAL

Sent = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def _no_faults() -> None:
    agent.install_faults(None)


@pytest.fixture
def node(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    test_pki: Pki,
    bundle_server: BundleServer,
    _no_faults: None,
) -> PlanNode:
    found = new_plan_node(tmp_path / "node", test_pki, bundle_server)
    for key, value in found.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("THEMIS_AGENT_FAULTS", raising=False)
    return found


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    captured: Sent = []
    lock = threading.Lock()

    def send_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
        assert queue == (HEARTBEAT_QUEUE if name == agent.HEARTBEAT_TASK else "dashboard")
        with lock:
            captured.append((name, dict(kwargs["envelope"]["payload"])))

    monkeypatch.setattr(app, "send_task", send_task)
    return captured


def _finals(sent: Sent, job_id: str) -> list[dict[str, Any]]:
    return [kw for name, kw in sent if name == agent.FINISHED_TASK and kw["job_id"] == job_id]


def _plan_steps(sent: Sent, job_id: str) -> list[str]:
    return [
        kw["plan_step"]
        for name, kw in sent
        if name == agent.PROGRESS_TASK and kw["job_id"] == job_id and "plan_step" in kw
    ]


def _installed(node: PlanNode) -> dict[str, str | None]:
    return {p: load_state(node.state_dir(p)).installed_version for p in (PRIMARY, STORAGE, QUERY)}


def _apply(node: PlanNode, job_id: str, args: dict[str, Any]) -> None:
    agent.apply_release(envelope=node.envelope(job_id, args))


def _applies(node: PlanNode) -> list[dict[str, Any]]:
    path = node.state_dir(PRIMARY) / agent.APPLIES_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------- configuration


def _env(node: PlanNode, components: str) -> dict[str, str]:
    return node.env(THEMIS_COMPONENTS=components)


def test_components_are_read_into_typed_entries(node: PlanNode) -> None:
    text = json.dumps(
        [
            {
                "product": STORAGE,
                "install_dir": "/opt/storage",
                "state_dir": "/var/lib/storage",
                "health_cmd": "storagectl ping",
            },
            {
                "product": QUERY,
                "install_dir": "/opt/query",
                "state_dir": "/var/lib/query",
                "health_url": "http://127.0.0.1:9/health",
            },
        ]
    )
    config = agent.AgentConfig.from_env(_env(node, text))
    assert config.components == (
        Component(STORAGE, Path("/opt/storage"), Path("/var/lib/storage"), "storagectl ping"),
        Component(QUERY, Path("/opt/query"), Path("/var/lib/query"), None, "http://127.0.0.1:9/health"),
    )  # fmt: skip
    assert config.all_components[0] == Component(
        PRIMARY, node.install_dir(PRIMARY), node.state_dir(PRIMARY)
    )
    assert agent.AgentConfig.from_env(_env(node, "")).components == ()


GOOD = {"product": STORAGE, "install_dir": "/opt/s", "state_dir": "/var/s"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{", "THEMIS_COMPONENTS: not JSON"),
        ('{"product": "x"}', "THEMIS_COMPONENTS: expected a JSON list"),
        ("[1]", "THEMIS_COMPONENTS: entry 1: expected an object"),
        (
            json.dumps([GOOD, {"product": QUERY, "install_dir": "/opt/q"}]),
            "THEMIS_COMPONENTS: entry 2 (themis-query): 'state_dir' missing",
        ),
        (
            json.dumps([{**GOOD, "product": ""}]),
            "THEMIS_COMPONENTS: entry 1: 'product' missing or not a non-empty string",
        ),
        (
            json.dumps([{**GOOD, "healthcmd": "true"}]),
            "THEMIS_COMPONENTS: entry 1 (themis-storage): unknown keys ['healthcmd']",
        ),
        (
            json.dumps([{**GOOD, "health_cmd": 3}]),
            "THEMIS_COMPONENTS: entry 1 (themis-storage): 'health_cmd' must be a string",
        ),
        (
            json.dumps([{**GOOD, "product": "Themis Storage"}]),
            "entry 1 (Themis Storage): 'Themis Storage' is not a product name",
        ),
        (
            json.dumps([GOOD, {**GOOD, "install_dir": "/opt/other", "state_dir": "/var/o"}]),
            "THEMIS_COMPONENTS: themis-storage: product themis-storage is also themis-storage's",
        ),
        (
            json.dumps([{**GOOD, "product": PRIMARY}]),
            "THEMIS_COMPONENTS: themisdb: product themisdb is also themisdb's",
        ),
        (
            json.dumps([{**GOOD, "product": f"p{i}"} for i in range(33)]),
            "THEMIS_COMPONENTS: 33 components, at most 32",
        ),
    ],
)
def test_a_bad_components_setting_refuses_the_agent_naming_the_entry(
    node: PlanNode, value: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match="^THEMIS_COMPONENTS: ") as err:
        agent.AgentConfig.from_env(_env(node, value))
    assert message in str(err.value)


def test_two_components_cannot_share_a_state_dir(node: PlanNode) -> None:
    shared = json.dumps([{**GOOD, "state_dir": str(node.state_dir(PRIMARY))}])
    with pytest.raises(RuntimeError) as err:
        agent.AgentConfig.from_env(_env(node, shared))
    assert str(err.value) == (
        f"THEMIS_COMPONENTS: themis-storage: state_dir {node.state_dir(PRIMARY)} is also themisdb's"
    )


def test_heartbeat_lists_every_component_primary_first(node: PlanNode, tmp_path: Path) -> None:
    fresh = [
        {"product": STORAGE, "install_dir": str(node.install_dir(STORAGE)),
         "state_dir": str(node.state_dir(STORAGE))},
        {"product": "themis-geo", "install_dir": str(tmp_path / "geo"),
         "state_dir": str(tmp_path / "geo-state")},
    ]  # fmt: skip
    node.install(STORAGE, "1.1")
    beat = agent.collect_heartbeat(agent.AgentConfig.from_env(_env(node, json.dumps(fresh))))
    assert beat["components"] == [
        {"product": PRIMARY, "version": "1.0"},
        {"product": STORAGE, "version": "1.1"},
        {"product": "themis-geo", "version": ""},  # never installed
    ]
    assert beat["installed_version"] == "1.0"
    # A state the engine cannot read: the heartbeat still goes out, the version unknown.
    (node.state_dir(STORAGE) / "node-state.json").write_text("{not json")
    beat = agent.collect_heartbeat(agent.AgentConfig.from_env(_env(node, json.dumps(fresh))))
    assert beat["components"][1] == {"product": STORAGE, "version": ""}


# ----------------------------------------------------------------------- plans


def test_a_plan_installs_every_step_in_order_and_reports_each(node: PlanNode, sent: Sent) -> None:
    _apply(node, "7", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "7")
    assert final["ok"] is True, final
    assert final["result"] == {
        "plan": [
            {"product": STORAGE, "version": "1.1", "state": "applied"},
            {"product": QUERY, "version": "1.1", "state": "applied"},
            {"product": PRIMARY, "version": "2.0", "state": "applied"},
        ]
    }
    assert _installed(node) == {PRIMARY: "2.0", STORAGE: "1.1", QUERY: "1.1"}
    assert (node.install_dir(QUERY) / "bin/themis-query").read_text().endswith("1.1\n")
    kept = json.loads((node.state_dir(PRIMARY) / agent.LAST_JOB_FILE).read_text())
    assert (kept["job_id"], kept["ok"], kept["result"]) == ("7", True, final["result"])
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    # Judged by its journal if cut short, not by the primary's version.
    entry = Ledger(node.state_dir(PRIMARY)).get("7")
    assert entry is not None and entry.target_version is None and entry.version_from == "1.0"
    texts = _plan_steps(sent, "7")
    # Accepted, then the whole plan's pre-flight before its first step's download.
    first = [(kw["step"], kw["percent"]) for n, kw in sent if n == agent.PROGRESS_TASK][:3]
    assert first == [(agent.ACCEPTED_STEP, 1), ("PREFLIGHT", 2), ("DOWNLOADING", 0)]
    assert "step 1 of 3: downloading themis-storage 1.1" in texts
    assert "step 2 of 3: installing themis-query 1.1" in texts
    assert texts[-1] == "step 3 of 3: installing themisdb 2.0"
    # The whole plan's percent only grows from step to step.
    percents = [kw["percent"] for n, kw in sent if n == agent.PROGRESS_TASK and "plan_step" in kw]
    assert percents[-1] == 100 and min(percents) >= 0
    assert [(a["job"], a["product"]) for a in _applies(node)] == [
        ("7", STORAGE), ("7", QUERY), ("7", PRIMARY),
    ]  # fmt: skip
    # Delivered again: the stored report, nothing applied twice.
    _apply(node, "7", node.plan_args(upgrade_steps(node)))
    assert _finals(sent, "7") == [final, final]
    assert len(_applies(node)) == 3


def _refused(node: PlanNode, sent: Sent, job_id: str, args: dict[str, Any]) -> dict[str, Any]:
    trees, state = node.trees(), node.engine_state()
    _apply(node, job_id, args)
    (final,) = _finals(sent, job_id)
    assert final["ok"] is False
    # Nothing written: every install dir and the engine's state of each component as before.
    assert node.trees() == trees
    assert node.engine_state() == state
    assert _applies(node) == []
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    return final


def _malformed(node: PlanNode) -> dict[str, Any]:
    good = upgrade_steps(node)
    return {
        "empty": [],
        "a step not an object": [good[0], "themis-query"],
        "no sha256": [good[0], {k: v for k, v in good[1].items() if k != "sha256"}],
        "bad sha256": [good[0], {**good[1], "sha256": "12ab"}],
        "bad version": [good[0], {**good[1], "version": "latest"}],
        "bad size": [good[0], {**good[1], "size": -1}],
        "unknown key": [good[0], {**good[1], "bundle_path": "/tmp/x"}],
        "twice": [good[0], good[0]],
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "plan: expected a non-empty list of steps"),
        ("a step not an object", "plan: step 2 of 2: expected an object"),
        ("no sha256", "plan: step 2 of 2: 'sha256' missing"),
        ("bad sha256", "plan: step 2 of 2: sha256 is not a SHA-256 hex digest"),
        ("bad version", "plan: step 2 of 2: version 'latest' is not a version"),
        ("bad size", "plan: step 2 of 2: size must be a whole number of bytes"),
        ("unknown key", "plan: step 2 of 2: unknown keys ['bundle_path']"),
        ("twice", "step 2 of 2 (themis-storage 1.1): themis-storage is in the plan twice"),
    ],
)
def test_a_malformed_plan_is_refused_before_anything_is_written(
    node: PlanNode, sent: Sent, case: str, message: str
) -> None:
    args = {**node.plan_args(upgrade_steps(node)), "plan": _malformed(node)[case]}
    final = _refused(node, sent, "8", args)
    assert final["error_code"] == "PLAN_INVALID"
    assert final["error_message"].startswith(message), final["error_message"]


def test_a_plan_of_too_many_steps_is_refused(node: PlanNode, sent: Sent) -> None:
    step = upgrade_steps(node)[0]
    final = _refused(node, sent, "8", {**node.plan_args([step]), "plan": [step] * 33})
    assert final["error_code"] == "PLAN_INVALID"
    assert final["error_message"] == "plan: 33 steps, at most 32"
    kept = json.loads((node.state_dir(PRIMARY) / agent.LAST_JOB_FILE).read_text())
    assert (kept["job_id"], kept["error_code"]) == ("8", "PLAN_INVALID")


def test_a_plan_step_s_percent_is_its_share_of_the_whole() -> None:
    last_of_three = agent.PlanPosition(3, 3, "step 3 of 3")
    assert [last_of_three.percent(p) for p in (0, 50, 100)] == [66, 83, 100]
    # An engine percent out of range counts as its bound.
    first_of_two = agent.PlanPosition(1, 2, "step 1 of 2")
    assert (first_of_two.percent(-5), first_of_two.percent(150)) == (0, 50)
    assert agent.PlanPosition(1, 1, "step 1 of 1").percent(101) == 100


def test_a_plan_that_is_not_a_list_is_a_refused_command(node: PlanNode, sent: Sent) -> None:
    """Typed like every argument: refused before any job is taken on, and told to the
    dashboard in the next heartbeat."""
    agent._take_refusals()
    trees, state = node.trees(), node.engine_state()
    args = {**node.plan_args(upgrade_steps(node)), "plan": {"steps": []}}
    _apply(node, "8", args)
    assert sent == [] and Ledger(node.state_dir(PRIMARY)).get("8") is None
    assert agent._take_refusals() == [{"command": "apply", "reason": "argument plan: wrong type"}]
    assert node.trees() == trees and node.engine_state() == state


def test_a_plan_naming_a_product_this_node_does_not_run_is_refused(
    node: PlanNode, sent: Sent
) -> None:
    steps = upgrade_steps(node)
    steps[1] = {**steps[1], "product": "themis-geo"}
    final = _refused(node, sent, "8", node.plan_args(steps))
    assert final["error_code"] == "PLAN_INVALID"
    assert final["error_message"] == (
        "step 2 of 3 (themis-geo 1.1): themis-geo is not a component of this node"
        " (themis-query, themis-storage, themisdb)"
    )


def test_a_step_whose_dependency_the_steps_before_it_do_not_meet_is_refused(
    node: PlanNode, sent: Sent
) -> None:
    """themisdb 2.0 first: storage and query are still 1.0 when it would go on."""
    steps = upgrade_steps(node)
    final = _refused(node, sent, "9", node.plan_args([steps[2], steps[0], steps[1]]))
    assert final["error_code"] == "DEPENDENCY_UNMET"
    assert final["error_message"] == (
        "step 1 of 3 (themisdb 2.0): dependency:themis-storage: themis-storage 1.0 does not"
        " satisfy >=1.1 (+1 more)"
    )
    assert final["result"] == {
        "plan": [
            {"product": PRIMARY, "version": "2.0", "state": "failed"},
            {"product": STORAGE, "version": "1.1", "state": "not_started"},
            {"product": QUERY, "version": "1.1", "state": "not_started"},
        ],
        "failed_step": 1,
    }


@pytest.mark.parametrize(
    ("dependency", "message"),
    [
        (
            Dependency("themis-geo", ">=1"),
            "dependency:themis-geo: themis-geo is not installed, need themis-geo >=1",
        ),
        (
            Dependency(STORAGE, ">=1.2", optional=True),
            "dependency:themis-storage: themis-storage 1.1 does not satisfy >=1.2",
        ),
        (
            Dependency(STORAGE, "<1.2", conflicts=True),
            "dependency:themis-storage: themis-storage 1.1 is within <1.2, which this"
            " release excludes",
        ),
    ],
)
def test_an_unmet_dependency_of_a_later_step_refuses_the_whole_plan(
    node: PlanNode, sent: Sent, dependency: Dependency, message: str
) -> None:
    """Checked against storage as step 1 leaves it (1.1), before step 1 is applied."""
    steps = upgrade_steps(node)
    steps[1] = node.step(node.bundle(QUERY, "1.1", (dependency,)), QUERY, "1.1")
    final = _refused(node, sent, "9", node.plan_args(steps))
    assert final["error_code"] == "DEPENDENCY_UNMET"
    assert final["error_message"] == f"step 2 of 3 (themis-query 1.1): {message}"
    assert final["result"]["failed_step"] == 2


def test_an_optional_dependency_not_installed_and_a_conflict_outside_pass(
    node: PlanNode, sent: Sent
) -> None:
    tolerant = (
        Dependency("themis-geo", ">=9", optional=True),
        Dependency(STORAGE, "<1.1", conflicts=True),
    )
    steps = upgrade_steps(node)
    steps[1] = node.step(node.bundle(QUERY, "1.1", tolerant), QUERY, "1.1")
    _apply(node, "9", node.plan_args(steps))
    (final,) = _finals(sent, "9")
    assert final["ok"] is True, final
    assert _installed(node) == {PRIMARY: "2.0", STORAGE: "1.1", QUERY: "1.1"}


def test_a_later_step_failing_its_pre_flight_refuses_the_whole_plan(
    node: PlanNode, sent: Sent
) -> None:
    steps = upgrade_steps(node)
    steps[1] = node.step(node.bundle(QUERY, "1.1", extra={"min_version": "1.0.5"}), QUERY, "1.1")
    final = _refused(node, sent, "9", node.plan_args(steps))
    assert final["error_code"] == "PREFLIGHT_FAILED"
    assert final["error_message"] == (
        "step 2 of 3 (themis-query 1.1): min_version: installed 1.0, bundle needs at least"
        " 1.0.5 installed first"
    )


def test_a_bundle_that_is_not_the_step_it_stands_for_is_refused(node: PlanNode, sent: Sent) -> None:
    steps = upgrade_steps(node)
    steps[1] = {**node.step(node.bundle(QUERY, "1.2"), QUERY, "1.2"), "version": "1.1"}
    final = _refused(node, sent, "9", node.plan_args(steps))
    assert final["error_code"] == "MANIFEST_INVALID"
    assert final["error_message"] == (
        "step 2 of 3 (themis-query 1.1): the bundle is themis-query 1.2"
    )


def test_a_bundle_of_another_product_is_refused(node: PlanNode, sent: Sent) -> None:
    steps = upgrade_steps(node)
    steps[1] = {**node.step(node.bundle(STORAGE, "1.2"), STORAGE, "1.2"), "product": QUERY}
    final = _refused(node, sent, "9", node.plan_args(steps))
    assert final["error_code"] == "MANIFEST_INVALID"
    assert (
        "step 2 of 3 (themis-query 1.2): manifest: product: 'themis-storage'"
        in (final["error_message"])
    )


def test_a_step_failing_its_health_check_rolls_back_every_step_before_it(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_COMPONENTS", node.components_env(**{QUERY: "exit 3"}))
    trees, versions = node.trees(), _installed(node)
    _apply(node, "10", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "10")
    assert final["ok"] is False
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
    assert final["error_message"].startswith("step 2 of 3 (themis-query 1.1): ")
    assert final["result"]["plan"] == [
        {"product": STORAGE, "version": "1.1", "state": "rolled_back"},
        {"product": QUERY, "version": "1.1", "state": "failed"},
        {"product": PRIMARY, "version": "2.0", "state": "not_started"},
    ]
    assert final["result"]["failed_step"] == 2
    assert node.trees() == trees and _installed(node) == versions
    # Storage's rollback protection is where the plan found it: 1.1 may come again.
    assert load_state(node.state_dir(STORAGE)).highest_version == "1.0"
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    assert [(a["job"], a["kind"]) for a in _applies(node)] == [
        ("10", "apply"), ("10", "apply"), ("10", "rollback"),
    ]  # fmt: skip
    assert "step 1 of 3: rolling back themis-storage 1.1" in _plan_steps(sent, "10")


def test_a_single_apply_checks_its_dependencies_against_the_components(
    node: PlanNode, sent: Sent
) -> None:
    bundle = node.bundle(PRIMARY, "2.0", (Dependency(STORAGE, ">=1.1"),))
    args = {k: v for k, v in node.plan_args([node.step(bundle, PRIMARY, "2.0")]).items()}
    del args["plan"]
    trees, state = node.trees(), node.engine_state()
    _apply(node, "11", args)
    (final,) = _finals(sent, "11")
    assert final["ok"] is False and final["error_code"] == "DEPENDENCY_UNMET"
    assert (
        "dependency:themis-storage: themis-storage 1.0 does not satisfy >=1.1"
        in (final["error_message"])
    )
    assert node.trees() == trees and node.engine_state() == state
    node.install(STORAGE, "1.1")
    _apply(node, "12", args)
    (done,) = _finals(sent, "12")
    assert done["ok"] is True and done["result"]["version_to"] == "2.0"


# -------------------------------------------------------------------- recovery


def _killed_plan_agent(node: PlanNode, job_id: str, args: dict[str, Any], **env: str) -> int:
    """An agent process running a plan, killed (SIGKILL) by one of its health checks;
    its reports go to a file, as a broker would have received them."""
    code = (
        "import json, sys\n"
        "from themis_dashboard.celery import app\n"
        "app.send_task = lambda name, kwargs, queue: None\n"
        "from workers import agent\n"
        "agent.apply_release(envelope=json.loads(sys.argv[1]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(node.envelope(job_id, args))],
        env={**procs.inherited_env(), **node.env(**env), "PYTHONPATH": str(procs.ROOT)},
        cwd=procs.ROOT,
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


def test_a_plan_cut_short_by_a_killed_agent_is_rolled_back_at_start(
    node: PlanNode, sent: Sent
) -> None:
    trees, versions = node.trees(), _installed(node)
    kill = node.components_env(**{QUERY: "kill -9 $PPID"})
    code = _killed_plan_agent(
        node, "13", node.plan_args(upgrade_steps(node)), THEMIS_COMPONENTS=kill
    )
    assert code == -signal.SIGKILL
    # Killed in step 2's health check: step 1 applied, step 2 switched, journals pending.
    assert _installed(node)[STORAGE] == "1.1"
    assert (node.state_dir(QUERY) / JOURNAL_FILE).exists()
    assert (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    # The plan's journal names the restore point each begun step made: what its undo restores.
    journaled = json.loads((node.state_dir(PRIMARY) / PLAN_JOURNAL).read_text())["steps"]
    assert [(s["state"], s["point_id"]) for s in journaled] == [
        ("applied", engine.list_points(node.state_dir(STORAGE))[-1]["id"]),
        ("applying", engine.list_points(node.state_dir(QUERY))[-1]["id"]),
        ("not_started", None),
    ]
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == ["13"]
    assert node.trees() == trees and _installed(node) == versions
    assert not (node.state_dir(QUERY) / JOURNAL_FILE).exists()
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    (final,) = _finals(sent, "13")
    assert final["ok"] is False and final["error_code"] == agent.INTERRUPTED
    assert final["error_message"] == (
        "interrupted; rolled back: the agent stopped during step 2 of 3 (themis-query 1.1);"
        " every step is back on its old version"
    )
    assert final["result"]["interrupted_step"] == 2 and "undo_errors" not in final["result"]
    # Kept on disk for the heartbeats too.
    last = json.loads((node.state_dir(PRIMARY) / agent.LAST_JOB_FILE).read_text())
    assert (last["job_id"], last["error_code"]) == ("13", agent.INTERRUPTED)
    assert final["result"]["plan"] == [
        {"product": STORAGE, "version": "1.1", "state": "rolled_back"},
        {"product": QUERY, "version": "1.1", "state": "rolled_back"},
        {"product": PRIMARY, "version": "2.0", "state": "not_started"},
    ]
    entry = Ledger(node.state_dir(PRIMARY)).get("13")
    assert entry is not None and entry.state is EntryState.FINISHED
    # Redelivered: the stored outcome, nothing applied again.
    _apply(node, "13", node.plan_args(upgrade_steps(node)))
    assert _finals(sent, "13") == [final, final]
    assert node.trees() == trees


def test_a_killed_plan_whose_undo_fails_at_start_reports_what_is_left(
    node: PlanNode, sent: Sent
) -> None:
    # Killed in step 2's health check, which first damaged step 1's restore point.
    health = f"{_rot_points(node, STORAGE)}; kill -9 $PPID"
    kill = node.components_env(**{QUERY: health})
    code = _killed_plan_agent(
        node, "22", node.plan_args(upgrade_steps(node)), THEMIS_COMPONENTS=kill
    )
    assert code == -signal.SIGKILL
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == ["22"]
    (final,) = _finals(sent, "22")
    assert (final["ok"], final["error_code"]) == (False, agent.INTERRUPTED)
    (undo,) = final["result"]["undo_errors"]
    assert undo.startswith("themis-storage 1.1: ")
    assert final["error_message"] == (
        "interrupted during step 2 of 3 (themis-query 1.1); not every step could be rolled"
        f" back: {undo}"
    )
    assert final["result"]["interrupted_step"] == 2
    # Step 1 stays on 1.1 and the journal stays for the next start to try again.
    assert _installed(node)[STORAGE] == "1.1"
    assert (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()


def test_a_journal_of_a_plan_that_finished_is_only_removed(node: PlanNode, sent: Sent) -> None:
    """Killed after the final report, before the journal was removed: nothing undone."""
    _apply(node, "14", node.plan_args(upgrade_steps(node)))
    journal = node.state_dir(PRIMARY) / PLAN_JOURNAL
    journal.write_text(
        json.dumps(
            {
                "job_id": "14",
                "outcome": "done",
                "steps": [
                    {"product": STORAGE, "version": "1.1",
                     "install_dir": str(node.install_dir(STORAGE)),
                     "state_dir": str(node.state_dir(STORAGE)), "version_from": "1.0",
                     "highest_from": "1.0", "state": "applied", "point_id": None},
                ],
            }
        )
    )  # fmt: skip
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == []
    assert not journal.exists()
    assert _installed(node) == {PRIMARY: "2.0", STORAGE: "1.1", QUERY: "1.1"}
    assert len(_finals(sent, "14")) == 1


def test_progress_of_a_plan_step_is_its_share_of_the_whole() -> None:
    position = agent.PlanPosition(2, 4, "step 2 of 4: installing x 1")
    assert [position.percent(p) for p in (0, 50, 100, 250)] == [25, 37, 50, 50]
    assert agent.PlanPosition(1, 1, "").percent(-5) == 0


def test_retention_prunes_every_components_restore_points(node: PlanNode) -> None:
    node.install(STORAGE, "1.1")
    node.install(STORAGE, "1.2")
    storage = [p["id"] for p in engine.list_points(node.state_dir(STORAGE))]
    primary = [p["id"] for p in engine.list_points(node.state_dir(PRIMARY))]
    assert len(storage) == 3 and len(primary) == 1
    config = agent.AgentConfig.from_env(node.env(THEMIS_RESTORE_POINTS_KEEP="1"))
    assert agent.cleanup_restore_points(config) == storage[:2]
    # The newest stays: the one a rollback of the installed 1.2 needs.
    assert [p["id"] for p in engine.list_points(node.state_dir(STORAGE))] == storage[2:]
    assert [p["id"] for p in engine.list_points(node.state_dir(PRIMARY))] == primary


def test_a_step_failing_verification_reports_its_checks(node: PlanNode, sent: Sent) -> None:
    failing = {"verify": {"smoke": [{"name": "query answers", "cmd": "exit 1"}]}}
    steps = upgrade_steps(node)
    steps[1] = node.step(node.bundle(QUERY, "1.1", extra=failing), QUERY, "1.1")
    trees = node.trees()
    _apply(node, "15", node.plan_args(steps))
    (final,) = _finals(sent, "15")
    assert final["error_code"] == "VERIFICATION_FAILED_ROLLED_BACK"
    (check,) = final["result"]["step_details"]["verification"]
    assert check["name"] == "query answers" and check["ok"] is False
    assert node.trees() == trees


def test_a_plan_on_a_drained_node_reports_the_drain_first_and_the_rejoin_last(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_DRAIN_CMD", "true")
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "true")
    _apply(node, "15", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "15")
    assert final["ok"] is True, final
    reports = [kw for name, kw in sent if name == agent.PROGRESS_TASK and kw["job_id"] == "15"]
    steps = [(kw["step"], kw["percent"]) for kw in reports]
    names = [step for step, _ in steps]
    # Drained once every bundle is fetched (the node serves meanwhile) and before the first
    # is installed; rejoined once after the last is in.
    last_download = len(names) - 1 - names[::-1].index("DOWNLOADING")
    assert last_download < names.index("DRAINING") < names.index("LOCKED")
    assert names.count("DRAINING") == names.count("REJOINING") == 1
    # Each as the node's own step, not as part of the plan step reported before it.
    assert steps[names.index("DRAINING")] == ("DRAINING", 3)
    assert "plan_step" not in reports[names.index("DRAINING")]
    assert steps[-1] == ("REJOINING", 95) and "plan_step" not in reports[-1]
    drains = (node.state_dir(PRIMARY) / agent.DRAIN_LOG).read_text().splitlines()
    assert [json.loads(line)["event"] for line in drains] == ["drain", "rejoin"]
    assert [json.loads(line)["job"] for line in drains] == ["15", "15"]


def test_a_drained_node_is_rejoined_after_a_failed_plan(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_DRAIN_CMD", "true")
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "true")
    monkeypatch.setenv("THEMIS_COMPONENTS", node.components_env(**{QUERY: "exit 3"}))
    _apply(node, "16", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "16")
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
    drains = (node.state_dir(PRIMARY) / agent.DRAIN_LOG).read_text().splitlines()
    assert [json.loads(line)["event"] for line in drains] == ["drain", "rejoin"]
    entry = Ledger(node.state_dir(PRIMARY)).get("16")
    assert entry is not None and entry.drained is False


def test_a_failing_rejoin_after_the_plan_fails_the_job_and_undoes_nothing(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "echo nope >&2; exit 4")
    _apply(node, "17", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "17")
    assert final["ok"] is False and final["error_code"] == "HOOK_FAILED"
    assert final["error_message"] == "rejoin command failed (4): nope"
    assert {s["state"] for s in final["result"]["plan"]} == {"applied"}
    assert _installed(node) == {PRIMARY: "2.0", STORAGE: "1.1", QUERY: "1.1"}
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()


def _rot_points(node: PlanNode, product: str) -> str:
    """A shell line that damages every saved file of the component's restore points."""
    points = node.state_dir(product) / "points"
    return (
        f'for b in {points}/*/blobs/*; do chattr -i "$b" 2>/dev/null; rm -f "$b";'
        ' echo rot > "$b"; done'
    )


def test_a_step_that_cannot_be_rolled_back_is_reported_and_tried_again_at_start(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2's health check fails after damaging step 1's restore point: step 1 stays
    on, the report says so, the node is not rejoined, and the journal stays for the
    next start to try again."""
    monkeypatch.setenv("THEMIS_DRAIN_CMD", "true")
    monkeypatch.setenv("THEMIS_REJOIN_CMD", "true")
    health = f"{_rot_points(node, STORAGE)}; exit 3"
    monkeypatch.setenv("THEMIS_COMPONENTS", node.components_env(**{QUERY: health}))
    _apply(node, "18", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "18")
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
    (undo,) = final["result"]["undo_errors"]
    assert undo.startswith("themis-storage 1.1: ") and "SHA-256" in undo
    assert [s["state"] for s in final["result"]["plan"]] == ["applied", "failed", "not_started"]
    assert _installed(node) == {PRIMARY: "1.0", STORAGE: "1.1", QUERY: "1.0"}
    drains = (node.state_dir(PRIMARY) / agent.DRAIN_LOG).read_text().splitlines()
    assert [json.loads(line)["event"] for line in drains] == ["drain"]  # not whole: drained
    journal = node.state_dir(PRIMARY) / PLAN_JOURNAL
    assert json.loads(journal.read_text())["outcome"] == ""
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == []
    assert journal.exists() and _installed(node)[STORAGE] == "1.1"  # still damaged
    assert len(_finals(sent, "18")) == 1  # the job had its report


def test_an_unreadable_plan_journal_is_left_for_an_operator(node: PlanNode) -> None:
    journal = node.state_dir(PRIMARY) / PLAN_JOURNAL
    journal.write_text('{"job_id": "19", "steps": [{"product": 3}]}')
    trees = node.trees()
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == []
    assert journal.read_text() == '{"job_id": "19", "steps": [{"product": 3}]}'
    assert node.trees() == trees


def test_the_journal_of_a_plan_running_in_this_agent_is_left_alone(
    node: PlanNode, sent: Sent
) -> None:
    """Another job's recovery in this agent must not undo a plan under way beside it."""
    ledger = Ledger(node.state_dir(PRIMARY))
    ledger.claim("20", JobKind.APPLY, target_version="2.0", version_from="1.0")
    node.install(STORAGE, "1.1")
    journal = node.state_dir(PRIMARY) / PLAN_JOURNAL
    step = {
        "product": STORAGE, "version": "1.1", "install_dir": str(node.install_dir(STORAGE)),
        "state_dir": str(node.state_dir(STORAGE)), "version_from": "1.0",
        "highest_from": "1.0", "state": "applied", "point_id": None,
    }  # fmt: skip
    journal.write_text(json.dumps({"job_id": "20", "outcome": "", "steps": [step]}))
    try:
        agent.settle_interrupted(agent.AgentConfig.from_env(node.env()), [])
        assert journal.exists() and _installed(node)[STORAGE] == "1.1"
    finally:
        ledger.release("20")
    # Once its owner is gone, the journal is a leftover: undone (its job had no report).
    agent.settle_interrupted(agent.AgentConfig.from_env(node.env()), [])
    assert not journal.exists() and _installed(node)[STORAGE] == "1.0"
    assert _finals(sent, "20") == []


def test_an_agent_killed_after_every_step_reports_the_plan_done_at_start(
    node: PlanNode, sent: Sent
) -> None:
    args = node.plan_args(upgrade_steps(node))
    code = _killed_plan_agent(
        node, "21", args, THEMIS_DRAIN_CMD="true", THEMIS_REJOIN_CMD="kill -9 $PPID"
    )
    assert code == -signal.SIGKILL
    assert agent.recover_at_start(agent.AgentConfig.from_env(node.env())) == ["21"]
    (final,) = _finals(sent, "21")
    assert final["ok"] is True and final["result"]["settled_after_restart"] is True
    assert {s["state"] for s in final["result"]["plan"]} == {"applied"}
    last = json.loads((node.state_dir(PRIMARY) / agent.LAST_JOB_FILE).read_text())
    assert (last["job_id"], last["ok"]) == ("21", True)
    assert _installed(node) == {PRIMARY: "2.0", STORAGE: "1.1", QUERY: "1.1"}
    assert not (node.state_dir(PRIMARY) / PLAN_JOURNAL).exists()
    entry = Ledger(node.state_dir(PRIMARY)).get("21")
    assert entry is not None and entry.drained is False  # rejoined at start


def test_an_undo_reports_each_step_it_rolls_back_at_that_steps_share(
    node: PlanNode, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THEMIS_COMPONENTS", node.components_env(**{QUERY: "exit 3"}))
    _apply(node, "19", node.plan_args(upgrade_steps(node)))
    (final,) = _finals(sent, "19")
    assert final["error_code"] == "HEALTH_CHECK_FAILED_ROLLED_BACK"
    undo = [
        (kw["plan_step"], kw["percent"])
        for name, kw in sent
        if name == agent.PROGRESS_TASK and "rolling back" in kw.get("plan_step", "")
    ]
    labels = list(dict.fromkeys(label for label, _ in undo))
    # Step 2's failed health check rolled it back in the engine already: the undo has only
    # step 1 to take back.
    assert labels == ["step 1 of 3: rolling back themis-storage 1.1"]
    for label, percent in undo:
        first = int(label.split()[1]) - 1  # the step's 0-based index
        assert 100 * first // 3 <= percent <= 100 * (first + 1) // 3, (label, percent)
    # Each engine run logged with its component: the two applies, then step 1's rollback.
    assert [(a["kind"], a["product"]) for a in _applies(node) if a["job"] == "19"] == [
        ("apply", STORAGE),
        ("apply", QUERY),
        ("rollback", STORAGE),
    ]


@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allowed"])
def test_a_plan_step_going_down_needs_the_downgrade_allowed(
    node: PlanNode, sent: Sent, allowed: bool
) -> None:
    """Pre-flight judges each step against its own component's installed version."""
    steps = [node.step(node.bundle(STORAGE, "0.9"), STORAGE, "0.9")]
    args = {**node.plan_args(steps), "allow_downgrade": allowed}
    if not allowed:
        final = _refused(node, sent, "31", args)
        assert (final["error_code"], final["error_message"]) == (
            "STALE_OR_DOWNGRADE",
            "step 1 of 1 (themis-storage 0.9): version: 0.9 is not newer than the installed 1.0",
        )
        return
    _apply(node, "31", args)
    (final,) = _finals(sent, "31")
    assert final["ok"] is True, final
    assert _installed(node)[STORAGE] == "0.9"


def test_a_plan_cut_before_its_first_step_began_is_reported_at_step_one_and_rejoined(
    node: PlanNode, sent: Sent
) -> None:
    """The agent died after journaling the plan and draining the node, before step 1
    began: nothing to undo; the job is reported interrupted in step 1 and the node rejoined."""
    ledger = Ledger(node.state_dir(PRIMARY))
    ledger.claim("32", JobKind.APPLY, target_version=None, version_from="1.0")
    ledger.set_drained("32", True)
    ledger.release("32")
    raw = json.loads(ledger.path("32").read_text())
    raw["owner"]["pid"], raw["owner"]["started"] = 2**22 + 7, 1.0  # a dead agent's
    ledger.path("32").write_text(json.dumps(raw))
    steps = [
        {
            "product": product, "version": "1.1", "install_dir": str(node.install_dir(product)),
            "state_dir": str(node.state_dir(product)), "version_from": "1.0",
            "highest_from": "1.0", "state": "not_started", "point_id": None,
        }
        for product in (STORAGE, QUERY)
    ]  # fmt: skip
    journal = node.state_dir(PRIMARY) / PLAN_JOURNAL
    journal.write_text(json.dumps({"job_id": "32", "outcome": "", "steps": steps}))
    trees = node.trees()
    config = agent.AgentConfig.from_env(node.env(THEMIS_REJOIN_CMD="true"))
    assert agent.recover_at_start(config) == ["32"]
    (final,) = _finals(sent, "32")
    assert (final["ok"], final["error_code"]) == (False, agent.INTERRUPTED)
    assert final["result"]["interrupted_step"] == 1
    assert "during step 1 of 2 (themis-storage 1.1)" in final["error_message"]
    drains = (node.state_dir(PRIMARY) / agent.DRAIN_LOG).read_text().splitlines()
    assert [json.loads(line)["event"] for line in drains] == ["rejoin"]
    assert node.trees() == trees and not journal.exists()
