"""SchemaMigrator: applies and rolls back migrations on the node database.

A migration runs as a sequence of operations, each committed together with the
migration's progress in `themis_schema_inflight`; the history row is written when it ends.
A failure anywhere undoes what this migration did (newest operation first), records the
attempt as failed and raises MigrationFailed naming the version, the operation and the
cause. After a crash `resume()` (which every mutating call runs first) takes the in-flight
migration on in the direction it was going, finishes online copies that had swapped,
and removes what an abandoned copy left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from ..errors import AlreadyInProgress, ManifestInvalid, MigrationFailed, MigrationTampered
from . import grace
from .connection import Connection, PostgresConnection, SqliteConnection, connect
from .context import OpContext, Undo
from .model import (
    HistoryEntry,
    HistoryOutcome,
    Migration,
    MigrationResult,
    Operation,
    Outcome,
    Phase,
)
from .online import OnlineCopy, Plan, Step, Tuning
from .ops import apply_op, describe, invert_op, shadow_for
from .parse import operations_from_json, operations_to_json
from .plugins import MigrationPlugin, discover_plugins
from .sql import quote
from .store import ONLINE, Direction, Inflight, Store

# How long a migrator waits for the lock (PostgreSQL) before another one is said to run.
LOCK_WAIT_SECONDS = 2.0
LOCK_KEY = int.from_bytes(hashlib.sha256(b"themis-schema-migrator").digest()[:4], "big")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ops_json(migration: Migration) -> str:
    return operations_to_json(migration.operations)


class SchemaMigrator:
    """The node database's migrations. `fault(step)` is called at every step boundary,
    after the step committed (tests kill or fail there): migration.started, op.applied,
    rollback.started, op.undone, history.recorded; online copies: online.shadow_created,
    online.triggers, online.backfill_chunk (each chunk), online.backfilled, online.verified,
    online.swapped, online.old_dropped; PostgreSQL concurrent index: index.recorded,
    index.built; grace drops: grace.restore_point (SQLite), grace.dropped."""

    def __init__(
        self,
        database_url: str,
        *,
        state_dir: Path,
        plugins: Sequence[MigrationPlugin] | None = None,
        chunk_rows: int = 2000,
        throttle_seconds: float = 0.0,
        now: Callable[[], datetime] = _utc_now,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        if chunk_rows < 1 or throttle_seconds < 0:
            raise ValueError("chunk_rows must be >= 1 and throttle_seconds >= 0")
        self.state_dir = Path(state_dir)
        self.chunk_rows = chunk_rows
        self.throttle_seconds = throttle_seconds
        self.now = now
        self._fault = fault
        self._plugins = list(plugins) if plugins is not None else None
        self.conn: Connection = connect(database_url)
        self.store = Store(self.conn)
        self.store.ensure()

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SchemaMigrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------

    def get_version(self) -> str | None:
        """The highest version currently applied (None: none is)."""
        applied = self.store.applied()
        return max(applied, key=int) if applied else None

    def get_history(self) -> list[HistoryEntry]:
        return self.store.history()

    # --- applying ----------------------------------------------------------------------

    def apply(self, migration: Migration) -> MigrationResult:
        with self._locked():
            self._resume()
            return self._apply(migration)

    def apply_all(
        self, migrations: Sequence[Migration], *, phase: Phase | None = None
    ) -> list[MigrationResult]:
        """In version order (only `phase`'s when given). If one fails, the ones this call
        applied are rolled back, newest first, before MigrationFailed propagates."""
        versions = [m.version for m in migrations]
        twice = next((v for v in versions if versions.count(v) > 1), None)
        if twice is not None:
            raise ManifestInvalid(f"migrations: version {twice} appears twice")
        chosen = sorted(
            (m for m in migrations if phase is None or m.phase == phase), key=lambda m: m.number
        )
        with self._locked():
            self._resume()
            for m in chosen:
                self._check_tamper(m)
            return self._apply_in_order(chosen)

    def _apply_in_order(self, chosen: list[Migration]) -> list[MigrationResult]:
        results: list[MigrationResult] = []
        for m in chosen:
            try:
                results.append(self._apply(m))
            except MigrationFailed as exc:
                applied_now = [r.version for r in results if r.outcome == Outcome.APPLIED]
                problems = self._roll_back_quietly(applied_now)
                if problems:
                    raise MigrationFailed(f"{exc}; rolling back {problems}") from exc
                raise
        return results

    def _roll_back_quietly(self, versions: list[str]) -> str:
        problems = []
        for version in reversed(versions):
            try:
                self._rollback(version)
            except MigrationFailed as exc:
                problems.append(str(exc))
        return "; ".join(problems)

    def _check_tamper(self, m: Migration) -> bool:
        """True if already applied with the same checksum; MigrationTampered if applied
        with another."""
        stored = self.store.applied().get(m.version)
        if stored is None:
            return False
        if stored.checksum != m.checksum:
            raise MigrationTampered(
                f"migration {m.version}: applied with checksum {stored.checksum[:12]}…, the"
                f" bundle's has {m.checksum[:12]}…: not the migration that ran"
            )
        return True

    def _apply(self, m: Migration) -> MigrationResult:
        started = time.monotonic()
        if self._check_tamper(m):
            return MigrationResult(m.version, m.phase, Outcome.ALREADY_APPLIED, 0.0, ())
        run = Inflight(
            m.version, Direction.APPLY, 0, m.checksum, m.phase, m.description, _ops_json(m),
            [{} for _ in m.operations], self.now(),
        )  # fmt: skip
        with self.conn.transaction():
            self.store.begin(run)
        self._step("migration.started")
        steps = self._forward(run, m.operations)
        elapsed = time.monotonic() - started
        return MigrationResult(m.version, m.phase, Outcome.APPLIED, elapsed, tuple(steps))

    def _forward(
        self, run: Inflight, ops: Sequence[Operation], *, record: bool = True
    ) -> list[str]:
        steps = []
        for i in range(run.ops_done, len(ops)):
            try:
                apply_op(self._context(run, i, forward=True), ops[i])
                self._step("op.applied")
            except Exception as exc:
                self._failed(run.version, ops, i, exc)
            steps.append(describe(ops[i]))
        with self.conn.transaction():
            self.store.end(run)
            if record:
                self.store.record(run, HistoryOutcome.APPLIED, self.now())
        self._step("history.recorded")
        return steps

    def _failed(
        self, version: str, ops: Sequence[Operation], index: int, exc: Exception
    ) -> NoReturn:
        """Undo this migration's operations, record the attempt failed, raise."""
        cause = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        message = (
            f"migration {version}: operations[{index}] ({describe(ops[index])}) failed: {cause}"
        )
        run = self._reload()  # the database says what committed, not our in-memory copy
        run.direction, run.error = Direction.UNDO, message[:4000]
        with self.conn.transaction():
            self.store.save_progress(run)
        try:
            self._backward(run, ops)
        except Exception as undo_exc:
            raise MigrationFailed(
                f"{message}; undoing it failed too ({undo_exc}): resume() will retry"
            ) from exc
        raise MigrationFailed(message) from exc

    def _reload(self) -> Inflight:
        run = self.store.inflight()
        if run is None:  # pragma: no cover - the row is only removed when a run ends
            raise MigrationFailed("the in-flight migration record vanished")
        return run

    # --- rolling back ------------------------------------------------------------------

    def rollback(self, version: str) -> MigrationResult:
        with self._locked():
            self._resume()
            return self._rollback(version)

    def rollback_to(self, version: str | None) -> list[MigrationResult]:
        """Roll back every applied version above `version` (None: all), the last applied
        first (expand and contract phases can apply a lower version after a higher one)."""
        with self._locked():
            self._resume()
            floor = -1 if version is None else int(version)
            applied = self.store.applied()
            above = sorted((m for v, m in applied.items() if int(v) > floor), key=lambda m: m.order)
            return [self._rollback(m.version) for m in reversed(above)]

    def _rollback(self, version: str) -> MigrationResult:
        started = time.monotonic()
        applied = self.store.applied()
        stored = applied.get(version)
        if stored is None:
            return MigrationResult(version, Phase.EXPAND, Outcome.NOTHING_TO_DO, 0.0, ())
        later = sorted(
            (m for m in applied.values() if m.order > stored.order), key=lambda m: m.order
        )
        if later:
            raise MigrationFailed(
                f"rollback {version}: {later[-1].version} was applied after it and is still"
                " applied: roll that back first (rollback_to rolls back in order)"
            )
        ops = operations_from_json(stored.operations)
        run = Inflight(
            version, Direction.ROLLBACK, len(ops), stored.checksum, stored.phase,
            stored.description, stored.operations, stored.undo, self.now(),
        )  # fmt: skip
        with self.conn.transaction():
            self.store.begin(run)
        self._step("rollback.started")
        try:
            steps = self._backward(run, ops)
        except Exception as exc:
            self._rollback_failed(version, ops, exc)
        elapsed = time.monotonic() - started
        return MigrationResult(version, stored.phase, Outcome.ROLLED_BACK, elapsed, tuple(steps))

    def _backward(self, run: Inflight, ops: Sequence[Operation]) -> list[str]:
        steps = []
        while run.ops_done > 0:
            i = run.ops_done - 1
            invert_op(self._context(run, i, forward=False), ops[i], run.undo[i])
            self._step("op.undone")
            steps.append(f"undo {describe(ops[i])}")
        outcome = (
            HistoryOutcome.FAILED if run.direction is Direction.UNDO else HistoryOutcome.ROLLED_BACK
        )
        with self.conn.transaction():
            self.store.end(run)
            self.store.record(run, outcome, self.now())
        self._step("history.recorded")
        return steps

    def _rollback_failed(self, version: str, ops: Sequence[Operation], exc: Exception) -> NoReturn:
        """A rollback that fails puts back what it had undone, so the version stays
        applied as a whole; the attempt is recorded as failed."""
        run = self._reload()
        message = f"rollback {version}: undo of operations[{run.ops_done - 1}] failed: {exc}"
        run.direction, run.error = Direction.APPLY, message[:4000]
        with self.conn.transaction():
            self.store.save_progress(run)
        try:
            self._forward(run, ops, record=False)
        except MigrationFailed as again:
            if self.store.inflight() is None:
                # Re-applying failed and was undone: the schema is before the migration.
                with self.conn.transaction():
                    self.store.record(run, HistoryOutcome.ROLLED_BACK, self.now())
            raise MigrationFailed(f"{message}; re-applying failed too: {again}") from exc
        with self.conn.transaction():
            self.store.record(run, HistoryOutcome.FAILED, self.now())
        raise MigrationFailed(message) from exc

    # --- recovery ----------------------------------------------------------------------

    def resume(self) -> list[str]:
        """Finish or clean up what a crash interrupted; returns what it did."""
        with self._locked():
            return self._resume()

    def _resume(self) -> list[str]:
        done = self._finish_swapped()
        for pending in grace.load(self.conn):
            if pending.state is grace.DropState.DROPPING:
                grace.finish(self._grace_context(pending), pending)
                done.append(f"dropped {pending.label} (grace ended)")
        run = self.store.inflight()
        if run is not None:
            ops = operations_from_json(run.operations)
            if run.direction is Direction.APPLY:
                self._forward(run, ops)
            else:
                self._backward(run, ops)
            done.append(f"{run.version}: finished the interrupted {run.direction}")
        return done + self._abandon_orphans()

    def _finish_swapped(self) -> list[str]:
        rows = self.conn.query(
            f"SELECT name, spec FROM {ONLINE} WHERE step = ?", (str(Step.SWAPPED),)
        )
        copier = OnlineCopy(shadow_for(self.conn), self._tuning())
        for _name, spec in rows:
            copier.finish(Plan.from_json(spec))
        return [f"dropped {Plan.from_json(spec).old}" for _n, spec in rows]

    def _abandon_orphans(self) -> list[str]:
        """Online work nothing will go on with (no in-flight operation owns it)."""
        done = []
        copier = OnlineCopy(shadow_for(self.conn), self._tuning())
        for name, step, spec in self.conn.query(f"SELECT name, step, spec FROM {ONLINE}"):
            if step == Step.BUILDING and isinstance(self.conn, PostgresConnection):
                with self.conn.patient():
                    self.conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(name)}")
                with self.conn.transaction():
                    self.conn.execute(f"DELETE FROM {ONLINE} WHERE name = ?", (name,))
            else:
                copier.abort(Plan.from_json(spec))
            done.append(f"removed the abandoned {name}")
        return done

    def finish_grace(self) -> list[str]:
        """Drop the hidden columns whose grace period has ended (restore point first)."""
        with self._locked():
            self._resume()
            now = self.now()
            dropped = []
            for p in grace.load(self.conn):
                if p.state is grace.DropState.HIDDEN and p.drop_after <= now:
                    grace.finish(self._grace_context(p), p)
                    dropped.append(p.label)
            return dropped

    # --- helpers -----------------------------------------------------------------------

    def _step(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)

    def _tuning(self) -> Tuning:
        return Tuning(self.chunk_rows, self.throttle_seconds, self._step)

    def _plugin_list(self) -> list[MigrationPlugin]:
        if self._plugins is None:
            self._plugins = discover_plugins()
        return self._plugins

    def _context(self, run: Inflight, index: int, *, forward: bool) -> OpContext:
        def done(undo: Undo) -> None:
            # Runs inside the operation's last transaction.
            run.undo[index] = undo if forward else run.undo[index]
            run.ops_done = index + 1 if forward else index
            self.store.save_progress(run)

        return OpContext(
            self.conn, run.version, index, self.now(), self.state_dir, self._tuning(),
            self._plugin_list, done,
        )  # fmt: skip

    def _grace_context(self, p: grace.PendingDrop) -> OpContext:
        return OpContext(
            self.conn, p.version, p.op_index, self.now(), self.state_dir, self._tuning(),
            self._plugin_list, lambda _undo: None,
        )  # fmt: skip

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One migrator at a time per database: PostgreSQL's advisory lock, or a lock
        file beside the SQLite database (both go away with a crashed process)."""
        if isinstance(self.conn, SqliteConnection):
            with _file_lock(Path(f"{self.conn.path}.migrate-lock")):
                yield
            return
        # A migrator killed a moment ago holds the lock until its server process notices
        # the closed connection: wait that long before saying another one runs.
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not self.conn.scalar("SELECT pg_try_advisory_lock(?)", (LOCK_KEY,)):
            if time.monotonic() >= deadline:
                raise AlreadyInProgress("another schema migration is running on this database")
            time.sleep(0.05)
        try:
            yield
        finally:
            self.conn.scalar("SELECT pg_advisory_unlock(?)", (LOCK_KEY,))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyInProgress(f"another schema migration is running on {path.stem}") from None
        yield
    finally:
        os.close(fd)
