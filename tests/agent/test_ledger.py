"""The agent's job ledger on its own: durable entries, claims, owners, pruning,
and corrupt files handled as unknown jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.ledger import (
    CORRUPT_SUFFIX,
    ClaimOutcome,
    EntryState,
    JobKind,
    Ledger,
    Owner,
)

REPORT = {"ok": True, "error_code": "", "error_message": "", "result": {"version_to": "1.1"}}


def _claim(ledger: Ledger, job_id: str) -> ClaimOutcome:
    return ledger.claim(job_id, JobKind.APPLY, target_version="1.1", version_from="1.0").outcome


def test_an_entry_is_written_whole_and_read_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert _claim(ledger, "7") is ClaimOutcome.NEW
    on_disk = json.loads((tmp_path / "ledger" / "7.json").read_text())
    assert on_disk["state"] == "RUNNING" and on_disk["owner"]["pid"] == os.getpid()
    assert (on_disk["target_version"], on_disk["version_from"]) == ("1.1", "1.0")
    entry = ledger.get("7")
    assert entry is not None and entry.state is EntryState.RUNNING and entry.kind is JobKind.APPLY
    # in hand here: a second claim is answered "busy"
    assert _claim(ledger, "7") is ClaimOutcome.BUSY
    assert ledger.active_job_id() == "7"
    ledger.finish("7", JobKind.APPLY, REPORT)
    assert ledger.active_job_id() is None
    finished = ledger.get("7")
    assert finished is not None and finished.state is EntryState.FINISHED
    assert finished.report == REPORT and finished.owner is None and finished.finished
    assert _claim(ledger, "7") is ClaimOutcome.FINISHED
    # written by temp file + rename: nothing but the entries and the lock is left
    assert sorted(os.listdir(tmp_path / "ledger")) == [".lock", "7.json"]


def test_a_running_entry_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from workers.ledger import JobKind, Ledger\n"
        "Ledger(Path(sys.argv[1])).claim('8', JobKind.APPLY, target_version='1.1',"
        " version_from='1.0')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    ledger = Ledger(tmp_path)
    entry = ledger.get("8")
    assert entry is not None and entry.owner is not None and entry.owner.pid != os.getpid()
    assert not ledger.owner_alive(entry) and ledger.active_job_id() is None
    claim = ledger.claim("8", JobKind.APPLY, target_version="1.1", version_from="1.0")
    assert claim.outcome is ClaimOutcome.TAKEN_OVER
    assert claim.entry.owner is not None and claim.entry.owner.is_me()
    assert claim.entry.created == entry.created  # the same job, now owned here
    ledger.release("8")


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    me = Owner.me()
    assert me.process_alive()
    assert not Owner(pid=me.pid, started=me.started - 3600, boot=me.boot).process_alive()
    assert not Owner(pid=me.pid, started=me.started, boot="another-boot").process_alive()


def test_running_entry_owned_by_this_pid_but_not_in_hand_is_interrupted(tmp_path: Path) -> None:
    # e.g. a container's pid 1 restarted: same pid, earlier life
    ledger = Ledger(tmp_path)
    _claim(ledger, "9")
    ledger.release("9")
    assert [e.job_id for e in ledger.take_over_interrupted()] == ["9"]
    assert _claim(ledger, "9") is ClaimOutcome.BUSY
    ledger.release("9")


def test_prune_keeps_running_entries_and_the_newest_finished(tmp_path: Path) -> None:
    now = [1_000_000.0]
    ledger = Ledger(tmp_path, keep_days=1, keep_max=3, clock=lambda: now[0])
    for n in range(6):
        now[0] += 60
        _claim(ledger, f"j{n}")
        ledger.finish(f"j{n}", JobKind.APPLY, REPORT)
    _claim(ledger, "running")
    assert sorted(e.job_id for e in ledger.entries()) == ["j3", "j4", "j5", "running"]
    now[0] += 2 * 86400  # past keep_days: every finished one goes, the running one stays
    assert sorted(ledger.prune()) == ["j3", "j4", "j5"]
    assert [e.job_id for e in ledger.entries()] == ["running"]
    ledger.release("running")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"job_id": "5", "state": "DONE?"}',
        b'{"job_id": "5", "kind": "apply", "state": "FINISHED", "created": 1, "updated": 1}',
        b'{"job_id": "6", "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1}',
        b'{"job_id": "5", "kind": "apply", "state": "RUNNING", "updated": 1}',
        b'{"job_id": 5, "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1}',
        b'{"job_id": "5", "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1,'
        b' "owner": [1234]}',
    ],
    ids=[
        "torn",
        "not-an-object",
        "bad-state",
        "finished-without-report",
        "another-job",
        "missing-field",
        "job-id-not-text",
        "owner-not-an-object",
    ],
)
def test_a_corrupt_entry_is_an_unknown_job_logged_and_kept_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(tmp_path)
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "5.json").write_bytes(content)
    assert ledger.get("5") is None
    assert "corrupt" in caplog.text and "treated as unknown" in caplog.text
    assert (tmp_path / "ledger" / f"5.json{CORRUPT_SUFFIX}").read_bytes() == content
    assert ledger.active_job_id() is None and ledger.entries() == []
    assert _claim(ledger, "5") is ClaimOutcome.NEW  # a fresh, valid entry replaces it
    assert json.loads((tmp_path / "ledger" / "5.json").read_text())["state"] == "RUNNING"
    ledger.release("5")


def test_job_ids_never_become_paths(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for bad in ("../x", "", ".hidden", "a/b", "x" * 81):
        with pytest.raises(ValueError, match="not a valid ledger name"):
            ledger.get(bad)
    assert not (tmp_path / "x").exists()


def test_an_unreadable_entry_is_an_unknown_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ledger" / "5.json").mkdir(parents=True)  # reading it fails
    ledger = Ledger(tmp_path)
    assert ledger.get("5") is None and ledger.entries() == []
    assert "cannot read" in caplog.text and "treated as unknown" in caplog.text


def test_a_ledger_never_written_is_empty(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "fresh")
    assert ledger.entries() == [] and ledger.running() == []
    assert ledger.take_over_interrupted() == []
    assert ledger.active_job_id() is None


def test_take_over_leaves_jobs_in_hand_and_takes_those_without_a_live_owner(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    _claim(ledger, "live")  # in hand in this process
    ownerless = {
        "job_id": "old",
        "kind": "rollback",
        "state": "RUNNING",
        "created": 1,
        "updated": 1,
    }
    (tmp_path / "ledger" / "old.json").write_text(json.dumps(ownerless))
    taken = ledger.take_over_interrupted()
    assert [(e.job_id, e.kind) for e in taken] == [("old", JobKind.ROLLBACK)]
    assert taken[0].owner is not None and taken[0].owner.is_me()
    assert _claim(ledger, "live") is ClaimOutcome.BUSY  # still this process's
    for job_id in ("live", "old"):
        ledger.release(job_id)


def test_drained_is_recorded_only_on_a_running_job(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    _claim(ledger, "7")
    ledger.set_drained("7", True)
    entry = ledger.get("7")
    assert entry is not None and entry.drained
    ledger.finish("7", JobKind.APPLY, REPORT)
    ledger.set_drained("7", True)  # finished: the mark is not put back
    ledger.set_drained("8", True)  # unknown: no entry is made up
    finished = ledger.get("7")
    assert finished is not None and not finished.drained
    assert ledger.get("8") is None


def test_prune_drops_corrupt_files_older_than_the_horizon(tmp_path: Path) -> None:
    now = [1_000_000.0]
    ledger = Ledger(tmp_path, keep_days=1, clock=lambda: now[0])
    (tmp_path / "ledger").mkdir()
    old, recent = (tmp_path / "ledger" / f"{n}.json{CORRUPT_SUFFIX}" for n in ("1", "2"))
    for path, age_days in ((old, 2.0), (recent, 0.5)):
        path.write_bytes(b"{torn")
        stamp = now[0] - age_days * 86400
        os.utime(path, (stamp, stamp))
    ledger.prune()
    assert not old.exists() and recent.exists()  # kept for diagnosis while it is recent
