"""Whose job keeps the engine busy? When the engine lock is held, the agent reports its job
in progress only if no live agent of another job accounts for the lock; if one does, its
job is that one's and this job fails (test_agent_jobs covers both ends with a real apply).
Here the ledger and lock states in between, against the decision itself; and what the
dashboard hears of a command the agent refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT
from tests.security.signing import signed_command
from updates.engine.commands import CommandType
from updates.engine.lock import LOCK_FILE
from workers import agent
from workers.ledger import EntryState, JobKind, Ledger, LedgerEntry


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def _config(state: Path) -> agent.AgentConfig:
    return agent.AgentConfig.from_env(
        {"THEMIS_NODE_ID": "n1", "THEMIS_STATE_DIR": str(state), "THEMIS_INSTALL_DIR": "x"}
    )


def _mine(state: Path, job_id: str) -> agent.JobReporter:
    """This agent's delivery of `job_id`, claimed in the ledger as the apply path does."""
    ledger = Ledger(state)
    ledger.claim(job_id, JobKind.APPLY, target_version="1.1", version_from="1.0")
    return agent.JobReporter(job_id, "n1", None, ledger=ledger)


@pytest.fixture
def other_agent(state: Path) -> Iterator[subprocess.Popen[str]]:
    """Another live agent process that owns job 4 in the ledger (without the lock)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from workers.ledger import JobKind, Ledger\n"
        "Ledger(Path(sys.argv[1])).claim('4', JobKind.APPLY, target_version='1.1',"
        " version_from='1.0')\n"
        "print('claimed', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    yield proc
    proc.kill()
    proc.wait(30)


def _lock_held_by(state: Path, pid: int) -> None:
    (state / LOCK_FILE).write_text(json.dumps({"pid": pid, "command": "apply"}))


def test_a_live_agent_of_another_job_holding_the_lock_accounts_for_it(
    state: Path, other_agent: subprocess.Popen[str]
) -> None:
    # This job's own entry (3) sorts before the other's (4): it must not end the search.
    reporter = _mine(state, "3")
    _lock_held_by(state, other_agent.pid)
    assert agent._in_progress_elsewhere(_config(state), reporter) is False


def test_a_live_agent_of_another_job_not_holding_the_lock_does_not(
    state: Path, other_agent: subprocess.Popen[str]
) -> None:
    reporter = _mine(state, "5")
    _lock_held_by(state, other_agent.pid + 100_000)
    assert agent._in_progress_elsewhere(_config(state), reporter) is True


def test_an_entry_with_no_recorded_owner_accounts_for_nothing(state: Path) -> None:
    reporter = _mine(state, "5")
    now = time.time()
    Ledger(state)._write(
        LedgerEntry("4", JobKind.APPLY, EntryState.RUNNING, created=now, updated=now, owner=None)
    )
    _lock_held_by(state, 1)
    assert agent._in_progress_elsewhere(_config(state), reporter) is True


@pytest.fixture
def refusals() -> Iterator[None]:
    agent._take_refusals()
    yield
    agent._take_refusals()


@pytest.mark.usefixtures("refusals")
def test_a_refused_command_is_told_to_the_dashboard_with_its_reason(state: Path) -> None:
    key = bytes(range(32))
    env = {"THEMIS_NODE_ID": "n1", "THEMIS_STATE_DIR": str(state), "THEMIS_NODE_KEY": key.hex()}
    config = agent.AgentConfig.from_env(env)
    envelope = signed_command(key, "n1", CommandType.HEARTBEAT, {})
    extra = {name: 1 for name in ("g", "f", "e", "d", "c", "b", "a")}
    assert agent.open_command(config, CommandType.HEARTBEAT, envelope, extra) is None
    keyless = agent.AgentConfig.from_env({**env, "THEMIS_NODE_KEY": ""})
    assert agent.open_command(keyless, CommandType.HEARTBEAT, envelope, {}) is None
    assert agent._take_refusals() == [
        {
            "command": "heartbeat",
            "reason": "fields outside the signed envelope: ['a', 'b', 'c', 'd', 'e']",
        },
        {"command": "heartbeat", "reason": "this agent has no key to check commands with"},
    ]
    # The genuine command, alone, is accepted; once.
    assert agent.open_command(config, CommandType.HEARTBEAT, envelope, {}) is not None
    assert agent.open_command(config, CommandType.HEARTBEAT, envelope, {}) is None
    odd_job = signed_command(key, "n1", CommandType.CANCEL, {}, job_id="../7")
    assert agent.open_command(config, CommandType.CANCEL, odd_job, {}) is None
    assert agent._take_refusals() == [
        {"command": "heartbeat", "reason": "replayed: this command's nonce was seen before"},
        {"command": "cancel", "reason": "job id '../7' is not a plain job id"},
    ]


@pytest.mark.usefixtures("refusals")
def test_a_refusal_reason_is_cut_at_200_characters(state: Path) -> None:
    key = bytes(range(32))
    config = agent.AgentConfig.from_env(
        {"THEMIS_NODE_ID": "n1", "THEMIS_STATE_DIR": str(state), "THEMIS_NODE_KEY": key.hex()}
    )
    envelope = signed_command(key, "n1", CommandType.HEARTBEAT, {})
    extra = {f"{c}" * 60: 1 for c in "abcde"}
    assert agent.open_command(config, CommandType.HEARTBEAT, envelope, extra) is None
    ((refusal,),) = [agent._take_refusals()]
    assert len(refusal["reason"]) == 200
    assert refusal["reason"].startswith("fields outside the signed envelope: ['aaa")
