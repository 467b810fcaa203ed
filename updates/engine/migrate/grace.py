"""`drop_column` with a grace period.

Applying it only hides the column: renamed to `_themis_dropped_<col>_<version>` and
recorded in `themis_pending_drops` with its definition and `drop_after`; its data stays,
so the inverse is a rename back. `finish_grace()` drops the columns whose grace ended,
after taking a restore point of what the drop destroys:

- SQLite: an online backup of the database (`sqlite3.Connection.backup`) into
  `<state_dir>/migrations/<version>-<op index>.sqlite3`, then the column goes by an online
  copy (SQLite's own DROP COLUMN rewrites the table under the write lock).
- PostgreSQL: the column's values, keyed by primary key, in a side table
  `_themis_saved_<version>_<table>_<col>`, made in the transaction that drops the column.

The inverse after the drop re-adds the column (its type, NOT NULL and default as recorded)
and fills it from the restore point.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from .connection import ColumnInfo, Connection, PostgresConnection, SqliteConnection
from .context import OpContext
from .model import DropColumn
from .online import CopyKind, OnlineCopy, OperationError, Plan, names_for
from .shadow_sqlite import Change, SqliteShadow
from .sql import aux_name, qlist, quote, safe_default, safe_type
from .store import PENDING_DROPS, from_iso, iso

RESTORE_DIR = "migrations"


class DropState(StrEnum):
    HIDDEN = "hidden"
    DROPPING = "dropping"  # SQLite: restore point taken, online copy under way
    DROPPED = "dropped"


@dataclass(frozen=True)
class PendingDrop:
    version: str
    op_index: int
    table: str
    column: str
    hidden: str
    definition: ColumnInfo
    drop_after: datetime
    state: DropState
    restore_point: str

    @property
    def label(self) -> str:
        return f"{self.table}.{self.column} ({self.version})"


def hidden_name(column: str, version: str) -> str:
    return aux_name("_themis_dropped", column, version)


def load(
    conn: Connection, version: str | None = None, op_index: int | None = None
) -> list[PendingDrop]:
    sql = f"""SELECT version, op_index, tbl, col, hidden, definition, drop_after, state,
              restore_point FROM {PENDING_DROPS}"""
    params: list[str | int] = []
    if version is not None and op_index is not None:
        sql += " WHERE version = ? AND op_index = ?"
        params = [version, op_index]
    rows = conn.query(sql + " ORDER BY drop_after, version, op_index", params)
    return [
        PendingDrop(
            r[0], int(r[1]), r[2], r[3], r[4], ColumnInfo(**json.loads(r[5])), from_iso(r[6]),
            DropState(r[7]), r[8],
        )
        for r in rows
    ]  # fmt: skip


# --- apply: hide -------------------------------------------------------------------------


def hide(ctx: OpContext, op: DropColumn) -> None:
    conn = ctx.conn
    col = _droppable(conn, op.table, op.column)
    hidden = hidden_name(op.column, ctx.version)
    drop_after = ctx.now + timedelta(seconds=op.grace_seconds)
    with conn.transaction():
        conn.execute(
            f"ALTER TABLE {quote(op.table)} RENAME COLUMN {quote(op.column)} TO {quote(hidden)}"
        )
        conn.execute(
            f"""INSERT INTO {PENDING_DROPS} (version, op_index, tbl, col, hidden, definition,
                drop_after, state, restore_point) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '')""",
            (
                ctx.version, ctx.op_index, op.table, op.column, hidden,
                json.dumps(asdict(col)), iso(drop_after), str(DropState.HIDDEN),
            ),
        )  # fmt: skip
        ctx.done({"hidden": hidden})


def _droppable(conn: Connection, table: str, column: str) -> ColumnInfo:
    """Refuse, before anything changes, a column whose drop could not be undone as it was
    or that the new code could not live with while hidden."""
    if not conn.table_exists(table):
        raise OperationError(f"table {table} does not exist")
    col = conn.column(table, column)
    if col is None:
        raise OperationError(f"column {table}.{column} does not exist")
    if col.pk:
        raise OperationError(f"{table}.{column} is part of the primary key")
    if col.notnull and col.default is None:
        raise OperationError(
            f"{table}.{column} is NOT NULL without a default: rows could not be inserted"
            " while it is hidden"
        )
    if not safe_type(col.type) or (col.default is not None and not safe_default(col.default)):
        raise OperationError(f"{table}.{column}: its type or default could not be restored")
    for ix in conn.indexes(table):
        if column in ix.columns:
            raise OperationError(f"{table}.{column} is in index {ix.name}: drop that first")
    if _in_foreign_key(conn, table, column):
        raise OperationError(f"{table}.{column} is part of a foreign key")
    if isinstance(conn, PostgresConnection) and not [c for c in conn.columns(table) if c.pk]:
        raise OperationError(f"{table} has no primary key to keep {column}'s data by")
    return col


def _in_foreign_key(conn: Connection, table: str, column: str) -> bool:
    if isinstance(conn, SqliteConnection):
        rows = conn.query(f"PRAGMA foreign_key_list({quote(table)})")
        return any(r[3] == column for r in rows)
    sql = """SELECT 1 FROM pg_constraint c JOIN pg_attribute a
             ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
             WHERE c.contype = 'f' AND c.conrelid = ?::regclass AND a.attname = ?"""
    return bool(conn.query(sql, (quote(table), column)))


# --- finish_grace ------------------------------------------------------------------------


def finish(ctx: OpContext, pending: PendingDrop) -> None:
    """Drop one hidden column for good, restore point first."""
    if isinstance(ctx.conn, SqliteConnection):
        _finish_sqlite(ctx, ctx.conn, pending)
    else:
        _finish_postgres(ctx, pending)
    ctx.tuning.fault("grace.dropped")


def _finish_sqlite(ctx: OpContext, conn: SqliteConnection, pending: PendingDrop) -> None:
    if pending.state is DropState.HIDDEN:
        path = ctx.state_dir / RESTORE_DIR / f"{pending.version}-{pending.op_index}.sqlite3"
        backup(conn, path)
        with conn.transaction():
            _set_state(conn, pending, DropState.DROPPING, str(path))
        ctx.tuning.fault("grace.restore_point")
    shadow = SqliteShadow(conn)
    change = Change(CopyKind.DROP_COLUMN, column=pending.hidden)
    name, _old = names_for(pending.table, pending.version, pending.op_index, "grace")

    def make_plan() -> Plan:
        return shadow.plan(pending.table, pending.version, pending.op_index, "grace", change)

    OnlineCopy(shadow, ctx.tuning).run(
        name, make_plan, lambda: _set_state(conn, pending, DropState.DROPPED, None)
    )


def _finish_postgres(ctx: OpContext, pending: PendingDrop) -> None:
    conn = ctx.conn
    side = aux_name("_themis_saved", pending.version, pending.table, pending.column)
    key = [c.name for c in conn.columns(pending.table) if c.pk]
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {quote(side)}")
        conn.execute(
            f"CREATE TABLE {quote(side)} AS SELECT {qlist(key)},"
            f" {quote(pending.hidden)} AS _themis_value FROM {quote(pending.table)}"
        )
        conn.execute(f"ALTER TABLE {quote(pending.table)} DROP COLUMN {quote(pending.hidden)}")
        _set_state(conn, pending, DropState.DROPPED, side)


def _set_state(conn: Connection, p: PendingDrop, state: DropState, restore: str | None) -> None:
    if restore is None:
        sql = f"UPDATE {PENDING_DROPS} SET state = ? WHERE version = ? AND op_index = ?"
        conn.execute(sql, (str(state), p.version, p.op_index))
    else:
        sql = f"""UPDATE {PENDING_DROPS} SET state = ?, restore_point = ?
                  WHERE version = ? AND op_index = ?"""
        conn.execute(sql, (str(state), restore, p.version, p.op_index))


def backup(conn: SqliteConnection, path: Path) -> None:
    """The whole database, consistent, into `path` (temp file, fsync, rename): SQLite's
    online backup reads one snapshot and does not block writers in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    target = sqlite3.connect(str(tmp))
    try:
        conn.raw.backup(target)
    finally:
        target.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the inverse -------------------------------------------------------------------------


def unhide(ctx: OpContext, op: DropColumn) -> None:
    conn = ctx.conn
    found = load(conn, ctx.version, ctx.op_index)
    if not found:
        if conn.column(op.table, op.column) is None:
            raise OperationError(f"{op.table}.{op.column}: no record of the hidden column")
        with conn.transaction():
            ctx.done({})  # back already
        return
    pending = found[0]
    if pending.state is DropState.DROPPING:
        finish(ctx, pending)  # the drop was under way: complete it, then restore
        pending = load(conn, ctx.version, ctx.op_index)[0]
    if pending.state is DropState.HIDDEN:
        with conn.transaction():
            conn.execute(
                f"ALTER TABLE {quote(op.table)} RENAME COLUMN {quote(pending.hidden)}"
                f" TO {quote(op.column)}"
            )
            _forget(conn, pending)
            ctx.done({})
    elif isinstance(conn, SqliteConnection):
        _restore_sqlite(ctx, conn, pending)
    else:
        _restore_postgres(ctx, pending)


def _forget(conn: Connection, p: PendingDrop) -> None:
    sql = f"DELETE FROM {PENDING_DROPS} WHERE version = ? AND op_index = ?"
    conn.execute(sql, (p.version, p.op_index))


def _column_sql(conn: Connection, p: PendingDrop) -> str:
    d = p.definition
    parts = [quote(p.column), d.type]
    if d.default is not None:
        parts.append(f"DEFAULT {d.default}")
        if d.notnull:
            parts.append("NOT NULL")
    return " ".join(x for x in parts if x)


def _restore_sqlite(ctx: OpContext, conn: SqliteConnection, p: PendingDrop) -> None:
    path = Path(p.restore_point)
    if not path.is_file():
        raise OperationError(f"{p.label}: restore point {path} is missing")
    pk = [c.name for c in conn.columns(p.table) if c.pk]
    key = pk or ["rowid"]
    match = " AND ".join(f"r.{_k(k)} = {quote(p.table)}.{_k(k)}" for k in key)
    source = f"FROM themis_rp.{quote(p.table)} AS r WHERE {match}"
    conn.execute("ATTACH DATABASE ? AS themis_rp", (str(path),))
    try:
        with conn.transaction():
            if conn.column(p.table, p.column) is None:
                conn.execute(f"ALTER TABLE {quote(p.table)} ADD COLUMN {_column_sql(conn, p)}")
            conn.execute(
                f"UPDATE {quote(p.table)} SET {quote(p.column)} ="
                f" (SELECT r.{quote(p.hidden)} {source}) WHERE EXISTS (SELECT 1 {source})"
            )
            _forget(conn, p)
            ctx.done({})
    finally:
        conn.execute("DETACH DATABASE themis_rp")
    path.unlink(missing_ok=True)


def _k(name: str) -> str:
    return "rowid" if name == "rowid" else quote(name)


def _restore_postgres(ctx: OpContext, p: PendingDrop) -> None:
    conn = ctx.conn
    key = [c.name for c in conn.columns(p.table) if c.pk]
    t, s = quote(p.table), quote(p.restore_point)
    mine = ", ".join(f"{t}.{quote(k)}" for k in key)
    saved = ", ".join(f"s.{quote(k)}" for k in key)
    match = f"({mine}) = ({saved})"
    with conn.transaction():
        conn.execute(f"ALTER TABLE {t} ADD COLUMN {_column_sql(conn, p)}")
        conn.execute(
            f"UPDATE {t} SET {quote(p.column)} = s._themis_value FROM {s} AS s WHERE {match}"
        )
        conn.execute(f"DROP TABLE {s}")
        _forget(conn, p)
        ctx.done({})
