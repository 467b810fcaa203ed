"""The agent's job ledger on its own: durable entries, claims, owners, pruning,
and corrupt files handled as unknown jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.locks import flock_is_free
from updates.engine.lock import boot_id
from workers import ledger as ledger_module
from workers.ledger import (
    CORRUPT_SUFFIX,
    ClaimOutcome,
    EntryState,
    JobKind,
    Ledger,
    LedgerEntry,
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
    ("content", "reason"),
    [
        (
            b"{not json",
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (b"[]", "entry: expected an object"),
        (b'{"job_id": "5", "state": "DONE?"}', "'DONE?' is not a valid EntryState"),
        (
            b'{"job_id": "5", "kind": "apply", "state": "FINISHED", "created": 1, "updated": 1}',
            "a finished entry without its report",
        ),
        (
            b'{"job_id": "6", "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1}',
            "names job '6'",
        ),
        (
            b'{"job_id": "5", "kind": "apply", "state": "RUNNING", "updated": 1}',
            "entry: KeyError('created')",
        ),
        (
            b'{"job_id": 5, "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1}',
            "expected text, got int",
        ),
        (
            b'{"job_id": "5", "kind": "apply", "state": "RUNNING", "created": 1, "updated": 1,'
            b' "owner": [1234]}',
            "owner: expected an object",
        ),
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
    tmp_path: Path, content: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(tmp_path)
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "5.json").write_bytes(content)
    assert ledger.get("5") is None
    assert "corrupt" in caplog.text and "treated as unknown" in caplog.text
    assert f"is corrupt ({reason}); job 5" in caplog.text  # what is wrong, for whoever looks
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
        "report": [],  # not an object: no report
    }  # and written before the drained mark existed
    (tmp_path / "ledger" / "old.json").write_text(json.dumps(ownerless))
    taken = ledger.take_over_interrupted()
    assert [(e.job_id, e.kind) for e in taken] == [("old", JobKind.ROLLBACK)]
    assert taken[0].owner is not None and taken[0].owner.is_me()
    assert taken[0].drained is False and taken[0].report is None
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


# ------------------------------------------------------------------ what each write leaves


class Clock:
    """The ledger's clock, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _on_disk(root: Path, job_id: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((root / "ledger" / f"{job_id}.json").read_text())
    return document


def _read_back(ledger: Ledger, job_id: str) -> dict[str, Any]:
    entry = ledger.get(job_id)
    assert entry is not None
    return entry.to_json()


def test_each_write_leaves_the_whole_entry_on_disk(tmp_path: Path) -> None:
    clock = Clock(100.0)
    ledger = Ledger(tmp_path, clock=clock)
    _claim(ledger, "7")
    me = Owner.me().to_json()
    claimed = {
        "job_id": "7",
        "kind": "apply",
        "state": "RUNNING",
        "created": 100.0,
        "updated": 100.0,
        "target_version": "1.1",
        "version_from": "1.0",
        "owner": me,
        "drained": False,
        "finished": None,
        "report": None,
    }
    assert _on_disk(tmp_path, "7") == claimed
    assert (me["pid"], me["boot"]) == (os.getpid(), boot_id())  # a reboot ends its life
    assert _read_back(ledger, "7") == claimed
    clock.now = 200.0
    ledger.set_drained("7", True)
    assert _on_disk(tmp_path, "7") == {**claimed, "drained": True, "updated": 200.0}
    # the agent dies with the node drained; its next life takes the job over
    ledger.release("7")
    clock.now = 300.0
    assert [e.job_id for e in ledger.take_over_interrupted()] == ["7"]
    assert _on_disk(tmp_path, "7") == {**claimed, "drained": True, "updated": 300.0}
    clock.now = 400.0
    ledger.finish("7", JobKind.APPLY, REPORT)
    finished = _on_disk(tmp_path, "7")
    assert finished == {
        **claimed,
        "state": "FINISHED",
        "updated": 400.0,
        "owner": None,
        "finished": 400.0,
        "report": REPORT,
    }
    assert finished["drained"] is False  # a boolean on disk, not a null
    assert _read_back(ledger, "7") == finished


def test_finishing_a_job_with_no_entry_records_it_finished(tmp_path: Path) -> None:
    # e.g. its entry was lost or set aside as corrupt while the job ran
    ledger = Ledger(tmp_path, clock=Clock(500.0))
    done = ledger.finish("lost", JobKind.ROLLBACK, REPORT)
    assert _on_disk(tmp_path, "lost") == {
        "job_id": "lost",
        "kind": "rollback",
        "state": "FINISHED",
        "created": 500.0,
        "updated": 500.0,
        "target_version": None,
        "version_from": None,
        "owner": None,
        "drained": False,
        "finished": 500.0,
        "report": REPORT,
    }
    assert done == ledger.get("lost")
    claim = ledger.claim("lost", JobKind.ROLLBACK, target_version=None, version_from="1.1")
    assert claim.outcome is ClaimOutcome.FINISHED and claim.entry.report == REPORT


CANCELLED = {"ok": False, "error_code": "CANCELLED", "error_message": "cancelled", "result": {}}


def test_cancelling_an_unknown_job_records_it_finished_so_no_delivery_applies_it(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path, clock=Clock(600.0))
    claim = ledger.cancel("9", JobKind.APPLY, CANCELLED)
    assert claim.outcome is ClaimOutcome.NEW
    assert _on_disk(tmp_path, "9") == {
        "job_id": "9",
        "kind": "apply",
        "state": "FINISHED",
        "created": 600.0,
        "updated": 600.0,
        "target_version": None,
        "version_from": None,
        "owner": None,
        "drained": False,
        "finished": 600.0,
        "report": CANCELLED,
    }
    later = ledger.claim("9", JobKind.APPLY, target_version="1.1", version_from="1.0")
    assert later.outcome is ClaimOutcome.FINISHED and later.entry.report == CANCELLED
    assert ledger.active_job_id() is None


def test_cancelling_a_running_or_finished_job_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    _claim(ledger, "1")
    running = _on_disk(tmp_path, "1")
    busy = ledger.cancel("1", JobKind.APPLY, CANCELLED)
    assert busy.outcome is ClaimOutcome.BUSY and busy.entry.state is EntryState.RUNNING
    assert _on_disk(tmp_path, "1") == running
    ledger.finish("1", JobKind.APPLY, REPORT)
    finished = ledger.cancel("1", JobKind.APPLY, CANCELLED)
    assert finished.outcome is ClaimOutcome.FINISHED and finished.entry.report == REPORT
    assert _on_disk(tmp_path, "1")["report"] == REPORT


# ------------------------------------------------------------------ owners


@pytest.fixture
def other_agent() -> Iterator[Owner]:
    """Another live process on this machine, as the owner it would write."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        started = ledger_module._process_start(child.pid)
        assert started is not None
        yield Owner(pid=child.pid, started=started, boot=boot_id())
    finally:
        child.kill()
        child.wait(timeout=60)


def _write_running(root: Path, job_id: str, created: float, owner: Owner) -> None:
    entry = LedgerEntry(
        job_id=job_id,
        kind=JobKind.APPLY,
        state=EntryState.RUNNING,
        created=created,
        updated=created,
        target_version="1.1",
        owner=owner,
    )
    (root / "ledger").mkdir(exist_ok=True)
    (root / "ledger" / f"{job_id}.json").write_text(json.dumps(entry.to_json()))


def test_the_active_job_of_other_agents_is_the_newest_one(
    tmp_path: Path, other_agent: Owner
) -> None:
    _write_running(tmp_path, "a", 200.0, other_agent)
    _write_running(tmp_path, "b", 100.0, other_agent)
    ledger = Ledger(tmp_path)
    assert ledger.active_job_id() == "a"  # created last, though "b" sorts last
    busy = ledger.claim("b", JobKind.APPLY, target_version="1.1", version_from="1.0")
    assert busy.outcome is ClaimOutcome.BUSY  # a live owner: not taken over
    assert busy.entry.owner == other_agent and busy.entry.created == 100.0
    assert ledger.take_over_interrupted() == []


def test_the_active_job_follows_another_agent_finishing_it(
    tmp_path: Path, other_agent: Owner
) -> None:
    _write_running(tmp_path, "a", 100.0, other_agent)
    ledger = Ledger(tmp_path)
    assert ledger.active_job_id() == "a"
    ledger.finish("a", JobKind.APPLY, REPORT)
    assert ledger.active_job_id() is None


def test_an_unchanged_ledger_is_not_read_again_for_the_active_job(
    tmp_path: Path, other_agent: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_running(tmp_path, "a", 100.0, other_agent)
    ledger = Ledger(tmp_path)
    reads: list[str] = []
    read = Ledger.entries

    def counted(self: Ledger) -> list[LedgerEntry]:
        reads.append(str(self.dir))
        return read(self)

    monkeypatch.setattr(Ledger, "entries", counted)
    # every heartbeat asks; only a change of the directory makes it read the entries
    assert [ledger.active_job_id() for _ in range(3)] == ["a", "a", "a"]
    assert len(reads) == 1
    _write_running(tmp_path, "b", 200.0, other_agent)
    assert [ledger.active_job_id() for _ in range(2)] == ["b", "b"]
    assert len(reads) == 2


def test_a_job_in_hand_is_the_active_one_even_if_the_directory_time_did_not_move(
    tmp_path: Path,
) -> None:
    # a claim within the same tick of the file system clock as the last heartbeat
    ledger = Ledger(tmp_path)
    ledger.prune()  # the directory exists, with nothing running
    assert ledger.active_job_id() is None
    stamp = (tmp_path / "ledger").stat().st_mtime_ns
    _claim(ledger, "12")
    try:
        os.utime(tmp_path / "ledger", ns=(stamp, stamp))
        assert ledger.active_job_id() == "12"
    finally:
        ledger.release("12")


def test_of_two_jobs_in_hand_the_newer_id_is_the_active_one_in_number_order(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    _claim(ledger, "9")
    _claim(ledger, "10")
    try:
        assert ledger.active_job_id() == "10"  # not "9", which sorts after "10" as text
    finally:
        ledger.release("9")
        ledger.release("10")


def test_another_pid_is_never_this_process() -> None:
    me = Owner.me()
    assert me.is_me()
    assert not Owner(pid=me.pid + 1, started=me.started, boot=me.boot).is_me()


def test_a_start_time_a_full_tolerance_away_is_another_life_of_the_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pid = os.getpid()
    monkeypatch.setitem(ledger_module._start_times, pid, 1000.5)
    assert Owner(pid=pid, started=1001.25, boot=None).is_me()
    assert not Owner(pid=pid, started=1001.5, boot=None).is_me()
    monkeypatch.setattr(ledger_module, "_process_start", lambda _pid: 1000.5)
    assert Owner(pid=4242, started=999.75, boot=None).process_alive()
    assert not Owner(pid=4242, started=999.5, boot=None).process_alive()


# ------------------------------------------------------------------ pruning


def _write_finished(root: Path, job_id: str, finished: float | None) -> None:
    entry = {
        "job_id": job_id,
        "kind": "apply",
        "state": "FINISHED",
        "created": 1.0,
        "updated": 1.0,
        "finished": finished,
        "report": REPORT,
    }
    (root / "ledger").mkdir(exist_ok=True)
    (root / "ledger" / f"{job_id}.json").write_text(json.dumps(entry))


def test_prune_drops_finished_entries_from_just_past_keep_days(tmp_path: Path) -> None:
    now = 1_000_000.0
    horizon = now - 2 * 86400.0
    ledger = Ledger(tmp_path, keep_days=2, clock=Clock(now))
    _write_finished(tmp_path, "at-horizon", horizon)
    _write_finished(tmp_path, "just-past", horizon - 0.5)
    _write_finished(tmp_path, "recent", now - 60)
    aside = tmp_path / "ledger" / f"x.json{CORRUPT_SUFFIX}"
    for name, mtime in (("at-horizon", horizon), ("just-past", horizon - 0.5)):
        corrupt = tmp_path / "ledger" / f"{name}.json{CORRUPT_SUFFIX}"
        corrupt.write_bytes(b"{torn")
        os.utime(corrupt, (mtime, mtime))
    aside.write_bytes(b"{torn")  # set aside just now
    assert ledger.prune() == ["just-past"]
    assert sorted(os.listdir(tmp_path / "ledger")) == [
        ".lock",
        "at-horizon.json",
        f"at-horizon.json{CORRUPT_SUFFIX}",
        "recent.json",
        f"x.json{CORRUPT_SUFFIX}",
    ]


def test_a_finished_entry_without_a_finish_time_counts_as_the_oldest(tmp_path: Path) -> None:
    # the clock just past one keep_days from its origin: only a time of 0 is past it
    ledger = Ledger(tmp_path, keep_days=1, keep_max=5, clock=Clock(86400.5))
    _write_finished(tmp_path, "timeless", None)
    _write_finished(tmp_path, "at-one", 1.0)
    assert ledger.prune() == ["timeless"]
    assert [e.job_id for e in ledger.entries()] == ["at-one"]


def test_prune_goes_on_past_an_entry_or_a_leftover_that_vanished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = 1_000_000.0
    ledger = Ledger(tmp_path, keep_days=1, clock=Clock(now))
    for job_id in ("a", "b"):
        _write_finished(tmp_path, job_id, now - 3 * 86400)
    # a leftover that cannot be looked at (it points nowhere)
    (tmp_path / "ledger" / f"gone.json{CORRUPT_SUFFIX}").symlink_to(tmp_path / "nowhere")
    read = Ledger.entries

    def removed_by_hand_meanwhile(self: Ledger) -> list[LedgerEntry]:
        found = read(self)
        (self.dir / "a.json").unlink(missing_ok=True)
        return found

    monkeypatch.setattr(Ledger, "entries", removed_by_hand_meanwhile)
    assert sorted(ledger.prune()) == ["a", "b"]
    assert not (tmp_path / "ledger" / "b.json").exists()


# ------------------------------------------------------------------ housekeeping while idle


def _lock_is_free(root: Path) -> bool:
    """Whether another holder (another agent process, or any other open of the lock file)
    could take the ledger's lock now."""
    return flock_is_free(root / "ledger" / ".lock")


def test_while_idle_holds_the_lock_and_says_whether_a_live_job_runs(
    tmp_path: Path, other_agent: Owner
) -> None:
    ledger = Ledger(tmp_path)
    with ledger.while_idle() as idle:
        assert idle is True and not _lock_is_free(tmp_path)
    assert _lock_is_free(tmp_path)
    # a dead agent's RUNNING entry does not count
    _write_running(tmp_path, "dead", 100.0, Owner(pid=other_agent.pid, started=1.0, boot=None))
    with ledger.while_idle() as idle:
        assert idle is True
    _claim(ledger, "mine")  # in hand in this process
    try:
        with ledger.while_idle() as idle:
            assert idle is False
    finally:
        ledger.release("mine")
    _write_running(tmp_path, "theirs", 200.0, other_agent)  # another live agent's
    with ledger.while_idle() as idle:
        assert idle is False and not _lock_is_free(tmp_path)


def test_files_that_are_not_entries_are_left_out(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    _claim(ledger, "7")
    ledger.release("7")
    for stray in ("notes.txt", "7.json~", ".7.json", "bad name.json", "x.json.tmp"):
        (tmp_path / "ledger" / stray).write_text("{}")
    assert [e.job_id for e in ledger.entries()] == ["7"]
    assert [e.job_id for e in ledger.take_over_interrupted()] == ["7"]
    ledger.release("7")


def test_a_claim_taking_over_an_interrupted_job_records_and_holds_it(tmp_path: Path) -> None:
    clock = Clock(100.0)
    ledger = Ledger(tmp_path, clock=clock)
    fresh = ledger.claim("7", JobKind.APPLY, target_version="1.1", version_from="1.0")
    assert fresh.outcome is ClaimOutcome.NEW and fresh.entry == ledger.get("7")
    ledger.release("7")  # the delivery returned without finishing it
    clock.now = 250.0
    taken = ledger.claim("7", JobKind.APPLY, target_version="1.1", version_from="1.0")
    assert taken.outcome is ClaimOutcome.TAKEN_OVER and taken.entry == ledger.get("7")
    on_disk = _on_disk(tmp_path, "7")
    assert (on_disk["created"], on_disk["updated"]) == (100.0, 250.0)
    try:
        # owned and in hand here now: the next delivery finds it busy, not interrupted
        assert _claim(ledger, "7") is ClaimOutcome.BUSY
        assert ledger.active_job_id() == "7"
    finally:
        ledger.release("7")


def test_keep_max_keeps_the_latest_finished_and_no_finish_time_is_the_oldest(
    tmp_path: Path,
) -> None:
    # the clock near its origin, keep_days far away: only keep_max decides
    ledger = Ledger(tmp_path, keep_days=1, keep_max=1, clock=Clock(10.0))
    _write_finished(tmp_path, "timeless", None)
    _write_finished(tmp_path, "early", 0.5)
    assert ledger.prune() == ["timeless"]
    assert [e.job_id for e in ledger.entries()] == ["early"]


def test_a_corrupt_entry_that_cannot_be_set_aside_is_still_an_unknown_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ledger" / f"5.json{CORRUPT_SUFFIX}" / "taken").mkdir(parents=True)
    (tmp_path / "ledger" / "5.json").write_bytes(b"{torn")
    ledger = Ledger(tmp_path)
    assert ledger.get("5") is None and "is corrupt" in caplog.text
    assert (tmp_path / "ledger" / "5.json").read_bytes() == b"{torn"  # left where it was


def test_an_owner_recorded_without_a_boot_id_is_judged_by_pid_and_start_time(
    tmp_path: Path, other_agent: Owner
) -> None:
    _write_running(tmp_path, "7", 100.0, replace(other_agent, boot=None))
    ledger = Ledger(tmp_path)
    entry = ledger.get("7")
    assert entry is not None and entry.owner is not None and entry.owner.boot is None
    assert _claim(ledger, "7") is ClaimOutcome.BUSY  # its process still runs


def test_a_process_start_is_counted_from_boot_not_read_off_the_wall_clock(
    tmp_path: Path,
) -> None:
    """The start time survives a stepped wall clock: it is the process's start in clock
    ticks since boot, as /proc gives it (a command name with spaces and parentheses does
    not shift the field)."""
    me = ledger_module._process_start(os.getpid())
    assert me is not None and 0 < me <= time.clock_gettime(time.CLOCK_BOOTTIME) + 1
    # The kernel names a process after the file it runs: this one "a) (b) c d".
    odd = tmp_path / "a) (b) c d"
    odd.symlink_to(shutil.which("sleep") or "/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    assert ") (b) c d)" in Path(f"/proc/{child.pid}/stat").read_text()
    try:
        started = ledger_module._process_start(child.pid)
        assert started is not None and me <= started <= time.clock_gettime(time.CLOCK_BOOTTIME) + 1
    finally:
        child.kill()
        child.wait(timeout=60)
    assert ledger_module._process_start(child.pid) is None  # gone
