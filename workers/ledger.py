"""The node agent's job ledger: one durable JSON file per job in the state dir.

Celery delivers at least once, so the same command can reach the agent again
while it still runs the job, long after it finished it, or after the agent
died half way. The ledger is what lets the agent answer each of those without
applying anything twice: job id -> kind, target version, RUNNING/FINISHED,
the final report once finished.

Every write goes through `write_json_atomic` (temp file, fsync, rename, fsync
dir) under an exclusive `flock` on the ledger directory, so concurrent
deliveries (pool threads, or a second agent process on the same state dir)
claim a job one at a time and a crash leaves each entry whole.

A RUNNING entry names its owner (pid, process start time, boot id). The owner
is alive when that very process still runs; for this process, when the job is
registered as in hand here. A RUNNING entry whose owner is gone was
interrupted: the agent takes it over and decides its outcome after engine
recovery.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from updates.engine.lock import boot_id
from updates.engine.state import fsync_dir, write_json_atomic

log = logging.getLogger("themis.agent.ledger")

LEDGER_DIR = "ledger"
LOCK_NAME = ".lock"
CORRUPT_SUFFIX = ".corrupt"
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_KEEP_MAX = 500
# Job ids name files: anything else from the broker is refused, never a path.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")
# Process start times are floats from /proc; two reads of the same process agree
# to well within this.
_START_TOLERANCE = 1.0


class JobKind(StrEnum):
    APPLY = "apply"
    ROLLBACK = "rollback"
    CONTRACT = "contract"  # the installed release's contract migrations


class EntryState(StrEnum):
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"


class ClaimOutcome(StrEnum):
    NEW = "NEW"  # unknown job, now RUNNING and owned here: do the work
    FINISHED = "FINISHED"  # re-send the stored final report
    BUSY = "BUSY"  # a live owner runs it: report "in progress"
    TAKEN_OVER = "TAKEN_OVER"  # RUNNING, owner gone: owned here now, decide its outcome


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID.match(job_id))


_start_times: dict[int, float] = {}


def _process_start(pid: int) -> float | None:
    """When `pid` started, in seconds since boot: its start in clock ticks from
    /proc/<pid>/stat (nodes run Linux). Not psutil's create_time: that adds the boot time
    as the wall clock sees it now, and a clock stepped (NTP, a VM resumed) moves it, so the
    same process seemed another one (seen on a CI machine). None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: count from its end.
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return ticks / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Owner:
    pid: int
    started: float
    boot: str | None

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        if pid not in _start_times:
            _start_times[pid] = _process_start(pid) or 0.0
        return cls(pid=pid, started=_start_times[pid], boot=boot_id())

    def is_me(self) -> bool:
        me = Owner.me()
        return self.pid == me.pid and abs(self.started - me.started) < _START_TOLERANCE

    def process_alive(self) -> bool:
        """The very process that wrote the entry still runs (not a reused pid)."""
        current_boot = boot_id()
        if self.boot and current_boot and self.boot != current_boot:
            return False
        started = _process_start(self.pid)
        return started is not None and abs(started - self.started) < _START_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "boot": self.boot}

    @classmethod
    def from_json(cls, data: Any) -> Owner:
        if not isinstance(data, dict):
            raise ValueError("owner: expected an object")
        boot = data.get("boot")
        return cls(
            pid=int(data["pid"]),
            started=float(data["started"]),
            boot=str(boot) if boot is not None else None,
        )


@dataclass(frozen=True)
class LedgerEntry:
    job_id: str
    kind: JobKind
    state: EntryState
    created: float
    updated: float
    target_version: str | None = None
    version_from: str | None = None
    owner: Owner | None = None
    # Set before the drain command runs, cleared after rejoin: an agent that
    # dies in between rejoins the node once recovery has made it whole.
    drained: bool = False
    finished: float | None = None
    report: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind.value,
            "state": self.state.value,
            "created": self.created,
            "updated": self.updated,
            "target_version": self.target_version,
            "version_from": self.version_from,
            "owner": self.owner.to_json() if self.owner else None,
            "drained": self.drained,
            "finished": self.finished,
            "report": self.report,
        }

    @classmethod
    def from_json(cls, data: Any) -> LedgerEntry:
        """Strict: anything unexpected raises ValueError (a corrupt entry)."""
        if not isinstance(data, dict):
            raise ValueError("entry: expected an object")
        try:
            state = EntryState(data["state"])
            report = data.get("report")
            if state is EntryState.FINISHED and not isinstance(report, dict):
                raise ValueError("a finished entry without its report")
            owner = data.get("owner")
            finished = data.get("finished")
            return cls(
                job_id=_text(data["job_id"]),
                kind=JobKind(data["kind"]),
                state=state,
                created=float(data["created"]),
                updated=float(data["updated"]),
                target_version=_optional_text(data.get("target_version")),
                version_from=_optional_text(data.get("version_from")),
                owner=Owner.from_json(owner) if owner is not None else None,
                drained=bool(data.get("drained", False)),
                finished=float(finished) if finished is not None else None,
                report=report if isinstance(report, dict) else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"entry: {exc!r}") from exc


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    entry: LedgerEntry


# (ledger dir, job id) of the jobs this process has in hand right now. Kept
# per process on purpose: a RUNNING entry owned by this pid but not in here was
# left by an earlier life of a process that got the same pid (a container's
# pid 1), or by a delivery that returned without finishing it.
_in_hand: set[tuple[str, str]] = set()
_in_hand_lock = threading.Lock()


class Ledger:
    def __init__(
        self,
        state_dir: Path,
        *,
        keep_days: float = DEFAULT_KEEP_DAYS,
        keep_max: int = DEFAULT_KEEP_MAX,
        clock: Any = time.time,
    ) -> None:
        self.dir = Path(state_dir) / LEDGER_DIR
        self.keep_days, self.keep_max = keep_days, keep_max
        self.clock = clock

    # ---------------------------------------------------------------- reading

    def path(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError(f"job id {job_id!r} is not a valid ledger name")
        return self.dir / f"{job_id}.json"

    def get(self, job_id: str) -> LedgerEntry | None:
        """The entry, or None when unknown. A corrupt entry counts as unknown:
        it is logged and moved aside (kept for diagnosis), never raised."""
        path = self.path(job_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            log.exception("ledger: cannot read %s; job %s treated as unknown", path, job_id)
            return None
        try:
            entry = LedgerEntry.from_json(json.loads(raw))
            if entry.job_id != job_id:
                raise ValueError(f"names job {entry.job_id!r}")
        except ValueError as exc:
            log.error(
                "ledger: entry %s is corrupt (%s); job %s treated as unknown", path, exc, job_id
            )
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
            return None
        return entry

    def entries(self) -> list[LedgerEntry]:
        found = []
        for job_id in self._job_ids():
            entry = self.get(job_id)
            if entry is not None:
                found.append(entry)
        return found

    def _job_ids(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(
            n[: -len(".json")] for n in names if n.endswith(".json") and valid_job_id(n[:-5])
        )

    def running(self) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.state is EntryState.RUNNING]

    def owner_alive(self, entry: LedgerEntry) -> bool:
        if entry.owner is None:
            return False
        if entry.owner.is_me():
            with _in_hand_lock:
                return (str(self.dir), entry.job_id) in _in_hand
        return entry.owner.process_alive()

    def active_job_id(self) -> str | None:
        """The job a live agent is working on here now (the newest if several)."""
        with _in_hand_lock:
            # Job ids are the dashboard's decimal ids: "10" is newer than "9".
            mine = sorted(
                (job for where, job in _in_hand if where == str(self.dir)),
                key=lambda job: (len(job), job),
            )
        if mine:
            return mine[-1]
        live = [e for e in self._running_cached() if self.owner_alive(e)]
        return max(live, key=lambda e: e.created).job_id if live else None

    _running_cache: dict[str, tuple[int, list[LedgerEntry]]] = {}

    def _running_cached(self) -> list[LedgerEntry]:
        # Every heartbeat asks; the directory changes (rename) whenever an
        # entry does, so its mtime says when to read the entries again.
        try:
            stamp = self.dir.stat().st_mtime_ns
        except OSError:
            return []
        cached = Ledger._running_cache.get(str(self.dir))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        running = self.running()
        Ledger._running_cache[str(self.dir)] = (stamp, running)
        return running

    # ---------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    @contextlib.contextmanager
    def while_idle(self) -> Iterator[bool]:
        """Hold the ledger's lock, so no job can be claimed meanwhile; yields whether no
        live job is running here (a dead agent's RUNNING entry does not count). For
        node-side housekeeping that takes the engine lock: a job never finds it taken."""
        with self._locked():
            yield not any(self.owner_alive(entry) for entry in self.running())

    def _write(self, entry: LedgerEntry) -> None:
        write_json_atomic(self.path(entry.job_id), entry.to_json())

    def _hold(self, job_id: str) -> None:
        with _in_hand_lock:
            _in_hand.add((str(self.dir), job_id))

    def release(self, job_id: str) -> None:
        """This process no longer works on the job (finished or given up)."""
        with _in_hand_lock:
            _in_hand.discard((str(self.dir), job_id))

    def claim(
        self,
        job_id: str,
        kind: JobKind,
        *,
        target_version: str | None,
        version_from: str | None,
    ) -> Claim:
        """Decide, atomically with every other delivery, what this one does."""
        with self._locked():
            entry = self.get(job_id)
            if entry is not None and entry.state is EntryState.FINISHED:
                return Claim(ClaimOutcome.FINISHED, entry)
            if entry is not None and self.owner_alive(entry):
                return Claim(ClaimOutcome.BUSY, entry)
            now = self.clock()
            if entry is not None:
                taken = replace(entry, owner=Owner.me(), updated=now)
                self._write(taken)
                self._hold(job_id)
                return Claim(ClaimOutcome.TAKEN_OVER, taken)
            fresh = LedgerEntry(
                job_id=job_id,
                kind=kind,
                state=EntryState.RUNNING,
                created=now,
                updated=now,
                target_version=target_version,
                version_from=version_from,
                owner=Owner.me(),
            )
            self._write(fresh)
            self._hold(job_id)
            return Claim(ClaimOutcome.NEW, fresh)

    def cancel(self, job_id: str, kind: JobKind, report: dict[str, Any]) -> Claim:
        """The dashboard cancels a job. Unknown here: it is recorded FINISHED with
        `report` (NEW), so no later delivery of its command applies anything. Finished:
        FINISHED, with its own report. Running (or interrupted): BUSY, too late to cancel."""
        with self._locked():
            entry = self.get(job_id)
            if entry is not None:
                outcome = (
                    ClaimOutcome.FINISHED
                    if entry.state is EntryState.FINISHED
                    else ClaimOutcome.BUSY
                )
                return Claim(outcome, entry)
            now = self.clock()
            cancelled = LedgerEntry(
                job_id=job_id,
                kind=kind,
                state=EntryState.FINISHED,
                created=now,
                updated=now,
                finished=now,
                report=dict(report),
            )
            self._write(cancelled)
            self._prune_locked(now)
            return Claim(ClaimOutcome.NEW, cancelled)

    def take_over_interrupted(self) -> list[LedgerEntry]:
        """Every RUNNING entry whose owner is gone, now owned by this process."""
        taken = []
        with self._locked():
            for entry in self.running():
                if self.owner_alive(entry):
                    continue
                mine = replace(entry, owner=Owner.me(), updated=self.clock())
                self._write(mine)
                self._hold(entry.job_id)
                taken.append(mine)
        return taken

    def set_drained(self, job_id: str, drained: bool) -> None:
        with self._locked():
            entry = self.get(job_id)
            if entry is not None and entry.state is EntryState.RUNNING:
                self._write(replace(entry, drained=drained, updated=self.clock()))

    def finish(self, job_id: str, kind: JobKind, report: dict[str, Any]) -> LedgerEntry:
        """Record the final report (durably, before it is sent), then prune."""
        with self._locked():
            now = self.clock()
            entry = self.get(job_id) or LedgerEntry(
                job_id=job_id,
                kind=kind,
                state=EntryState.RUNNING,
                created=now,
                updated=now,
            )
            done = replace(
                entry,
                state=EntryState.FINISHED,
                owner=None,
                drained=False,
                updated=now,
                finished=now,
                report=dict(report),
            )
            self._write(done)
            self._prune_locked(now)
        self.release(job_id)
        return done

    def prune(self) -> list[str]:
        with self._locked():
            return self._prune_locked(self.clock())

    def _prune_locked(self, now: float) -> list[str]:
        """Drop FINISHED entries older than keep_days or beyond the newest
        keep_max; RUNNING entries are never dropped."""
        finished = [e for e in self.entries() if e.state is EntryState.FINISHED]
        finished.sort(key=lambda e: e.finished or 0.0, reverse=True)
        horizon = now - self.keep_days * 86400
        doomed = [
            e.job_id
            for index, e in enumerate(finished)
            if index >= self.keep_max or (e.finished or 0.0) < horizon
        ]
        for job_id in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(job_id))
        for name in os.listdir(self.dir):
            corrupt = self.dir / name
            if name.endswith(CORRUPT_SUFFIX):
                with contextlib.suppress(OSError):
                    if corrupt.stat().st_mtime < horizon:
                        corrupt.unlink()
        if doomed:
            fsync_dir(self.dir)
        return doomed
