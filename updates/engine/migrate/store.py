"""The migrator's bookkeeping tables in the node database.

- `themis_schema_history`: one row per finished attempt (applied, rolled back, failed),
  with the migration's operations as JSON and what their inverses need (`undo`), so a
  rollback never needs the bundle.
- `themis_schema_inflight`: the migration being applied, rolled back or undone, with how
  many operations are done; each operation commits together with this counter, so after a
  crash `resume()` knows exactly where to go on.
- `themis_online_ddl`: each online operation's step and last copied key.
- `themis_pending_drops`: columns hidden by `drop_column`, until their grace period ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .connection import Connection, Dialect
from .model import HistoryEntry, HistoryOutcome, Phase

HISTORY = "themis_schema_history"
INFLIGHT = "themis_schema_inflight"
ONLINE = "themis_online_ddl"
PENDING_DROPS = "themis_pending_drops"


def _ddl(dialect: Dialect) -> list[str]:
    serial = "INTEGER PRIMARY KEY" if dialect is Dialect.SQLITE else "BIGSERIAL PRIMARY KEY"
    return [
        f"""CREATE TABLE IF NOT EXISTS {HISTORY} (
            id {serial}, version TEXT NOT NULL, checksum TEXT NOT NULL, phase TEXT NOT NULL,
            description TEXT NOT NULL, operations TEXT NOT NULL, undo TEXT NOT NULL,
            started_at TEXT NOT NULL, finished_at TEXT NOT NULL, duration_ms BIGINT NOT NULL,
            outcome TEXT NOT NULL, error TEXT NOT NULL DEFAULT '')""",
        f"""CREATE TABLE IF NOT EXISTS {INFLIGHT} (
            version TEXT PRIMARY KEY, direction TEXT NOT NULL, ops_done INTEGER NOT NULL,
            checksum TEXT NOT NULL, phase TEXT NOT NULL, description TEXT NOT NULL,
            operations TEXT NOT NULL, undo TEXT NOT NULL, started_at TEXT NOT NULL,
            error TEXT NOT NULL DEFAULT '')""",
        f"""CREATE TABLE IF NOT EXISTS {ONLINE} (
            name TEXT PRIMARY KEY, tbl TEXT NOT NULL, version TEXT NOT NULL,
            op_index INTEGER NOT NULL, step TEXT NOT NULL, last_key TEXT, spec TEXT NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS {PENDING_DROPS} (
            version TEXT NOT NULL, op_index INTEGER NOT NULL, tbl TEXT NOT NULL,
            col TEXT NOT NULL, hidden TEXT NOT NULL, definition TEXT NOT NULL,
            drop_after TEXT NOT NULL, state TEXT NOT NULL, restore_point TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (version, op_index))""",
    ]


class Direction(StrEnum):
    APPLY = "apply"  # forward, from a call to apply
    ROLLBACK = "rollback"  # backward, from a call to rollback
    UNDO = "undo"  # backward, after a failed apply


@dataclass
class Inflight:
    version: str
    direction: Direction
    ops_done: int
    checksum: str
    phase: Phase
    description: str
    operations: str  # JSON
    undo: list[dict[str, Any]]  # one entry per operation, what its inverse needs
    started_at: datetime
    error: str = ""


@dataclass(frozen=True)
class StoredMigration:
    """The latest applied attempt of a version, as its rollback needs it."""

    version: str
    checksum: str
    phase: Phase
    description: str
    operations: str
    undo: list[dict[str, Any]]
    order: int  # its history row's id: when it was applied, relative to the others


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


class Store:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ensure(self) -> None:
        """Create the bookkeeping tables on first use (only then: a status query needs no
        write, and two processes starting at once do not race on CREATE)."""
        tables = (HISTORY, INFLIGHT, ONLINE, PENDING_DROPS)
        if all(self.conn.table_exists(t) for t in tables):
            return
        with self.conn.transaction():
            for statement in _ddl(self.conn.dialect):
                self.conn.execute(statement)

    # --- history -----------------------------------------------------------------------

    def record(self, run: Inflight, outcome: HistoryOutcome, finished: datetime) -> None:
        duration = max(0, round((finished - run.started_at).total_seconds() * 1000))
        self.conn.execute(
            f"""INSERT INTO {HISTORY} (version, checksum, phase, description, operations, undo,
                started_at, finished_at, duration_ms, outcome, error)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                run.version, run.checksum, str(run.phase), run.description, run.operations,
                json.dumps(run.undo), iso(run.started_at), iso(finished), duration,
                str(outcome), run.error,
            ),
        )  # fmt: skip

    def history(self) -> list[HistoryEntry]:
        rows = self.conn.query(
            f"""SELECT version, checksum, phase, description, started_at, finished_at,
                duration_ms, outcome, error FROM {HISTORY} ORDER BY id"""
        )
        return [
            HistoryEntry(
                r[0], r[1], Phase(r[2]), r[3], from_iso(r[4]), from_iso(r[5]), int(r[6]), r[7], r[8]
            )
            for r in rows
        ]

    def applied(self) -> dict[str, StoredMigration]:
        """Versions whose latest applied-or-rolled-back attempt is applied. A failed
        attempt changes nothing: a failed apply leaves the schema as it was, and so does a
        failed rollback."""
        rows = self.conn.query(
            f"""SELECT version, checksum, phase, description, operations, undo, outcome, id
                FROM {HISTORY} WHERE outcome IN (?, ?) ORDER BY id""",
            (str(HistoryOutcome.APPLIED), str(HistoryOutcome.ROLLED_BACK)),
        )
        state: dict[str, StoredMigration | None] = {}
        for version, checksum, phase, description, operations, undo, outcome, order in rows:
            if outcome == HistoryOutcome.APPLIED:
                loaded = json.loads(undo)
                state[version] = StoredMigration(
                    version, checksum, Phase(phase), description, operations, loaded, int(order)
                )
            else:
                state[version] = None
        return {v: m for v, m in state.items() if m is not None}

    # --- in-flight migration -----------------------------------------------------------

    def inflight(self) -> Inflight | None:
        rows = self.conn.query(
            f"""SELECT version, direction, ops_done, checksum, phase, description, operations,
                undo, started_at, error FROM {INFLIGHT}"""
        )
        if not rows:
            return None
        r = rows[0]
        return Inflight(
            r[0], Direction(r[1]), int(r[2]), r[3], Phase(r[4]), r[5], r[6], json.loads(r[7]),
            from_iso(r[8]), r[9],
        )  # fmt: skip

    def begin(self, run: Inflight) -> None:
        self.conn.execute(
            f"""INSERT INTO {INFLIGHT} (version, direction, ops_done, checksum, phase,
                description, operations, undo, started_at, error)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                run.version, str(run.direction), run.ops_done, run.checksum, str(run.phase),
                run.description, run.operations, json.dumps(run.undo), iso(run.started_at),
                run.error,
            ),
        )  # fmt: skip

    def save_progress(self, run: Inflight) -> None:
        self.conn.execute(
            f"UPDATE {INFLIGHT} SET direction = ?, ops_done = ?, undo = ?, error = ?"
            " WHERE version = ?",
            (str(run.direction), run.ops_done, json.dumps(run.undo), run.error, run.version),
        )

    def end(self, run: Inflight) -> None:
        self.conn.execute(f"DELETE FROM {INFLIGHT} WHERE version = ?", (run.version,))
