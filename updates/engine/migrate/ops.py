"""Each operation and its inverse.

An operation either commits in one transaction together with the migration's progress
(`ctx.done(...)`, which records that it is done and what its inverse needs), or, when it
cannot be one transaction (online copies, CREATE INDEX CONCURRENTLY), records its own
progress and commits the migration's progress with its last step. So after a crash an
operation is either done and counted, or resumable from its own record.
"""

from __future__ import annotations

import sqlite3
from typing import cast

from . import grace
from .connection import Connection, Dialect, PostgresConnection, SqliteConnection
from .context import OpContext, Undo
from .model import (
    AddColumn,
    AddIndex,
    ChangeColumnType,
    Custom,
    DropColumn,
    Operation,
    RenameColumn,
)
from .online import CopyKind, OnlineCopy, OperationError, Plan, Step, names_for
from .plugins import plugin_for
from .shadow_pg import PostgresShadow, alter_type_sql
from .shadow_sqlite import Change, SqliteShadow, index_sql
from .sql import literal, qlist, quote, safe_type
from .store import ONLINE


def apply_op(ctx: OpContext, op: Operation) -> None:
    if isinstance(op, AddColumn):
        _add_column(ctx, op)
    elif isinstance(op, RenameColumn):
        _rename(ctx, op.table, op.old, op.new)
    elif isinstance(op, AddIndex):
        _add_index(ctx, op)
    elif isinstance(op, DropColumn):
        grace.hide(ctx, op)
    elif isinstance(op, ChangeColumnType):
        _change_type(ctx, op.table, op.column, ctx.conn.type_sql(op.type), op.online)
    else:
        _custom(ctx, op, undo=False)


def invert_op(ctx: OpContext, op: Operation, undo: Undo) -> None:
    if isinstance(op, AddColumn):
        _drop_added_column(ctx, op)
    elif isinstance(op, RenameColumn):
        _rename(ctx, op.table, op.new, op.old)
    elif isinstance(op, AddIndex):
        _drop_index(ctx, op)
    elif isinstance(op, DropColumn):
        grace.unhide(ctx, op)
    elif isinstance(op, ChangeColumnType):
        old_type = str(undo.get("old_type", ""))
        if not safe_type(old_type):
            raise OperationError(f"{op.table}.{op.column}: stored old type {old_type!r} refused")
        _change_type(ctx, op.table, op.column, old_type, op.online)
    else:
        _custom(ctx, op, undo=True)


def describe(op: Operation) -> str:
    """A short name for messages: `add_column orders.status`."""
    if isinstance(op, Custom):
        return f"custom {op.plugin}"
    target = getattr(op, "column", None) or getattr(op, "old", None) or getattr(op, "name", "")
    return f"{op.kind} {op.table}.{target}"


# --- plain DDL ---------------------------------------------------------------------------


def require_table(conn: Connection, table: str) -> None:
    if not conn.table_exists(table):
        raise OperationError(f"table {table} does not exist")


def require_column(conn: Connection, table: str, column: str) -> None:
    require_table(conn, table)
    if conn.column(table, column) is None:
        raise OperationError(f"column {table}.{column} does not exist")


def _add_column(ctx: OpContext, op: AddColumn) -> None:
    require_table(ctx.conn, op.table)
    if ctx.conn.column(op.table, op.column) is not None:
        raise OperationError(f"column {op.table}.{op.column} already exists")
    parts = [quote(op.column), ctx.conn.type_sql(op.type)]
    if not op.nullable:
        parts.append("NOT NULL")
    if op.default is not None:
        parts.append(f"DEFAULT {literal(op.default)}")
    # Nullable or a constant default: SQLite and PostgreSQL >= 11 only change the
    # catalog, no row is rewritten.
    with ctx.conn.transaction():
        ctx.conn.execute(f"ALTER TABLE {quote(op.table)} ADD COLUMN {' '.join(parts)}")
        ctx.done({})


def _drop_added_column(ctx: OpContext, op: AddColumn) -> None:
    if ctx.conn.column(op.table, op.column) is None and not _copy_pending(ctx, op.table):
        with ctx.conn.transaction():
            ctx.done({})  # gone already (the inverse is idempotent)
        return
    if isinstance(ctx.conn, SqliteConnection) and not _copy_pending(ctx, op.table):
        try:
            with ctx.conn.transaction():
                ctx.conn.execute(f"ALTER TABLE {quote(op.table)} DROP COLUMN {quote(op.column)}")
                ctx.done({})
            return
        except sqlite3.OperationalError:
            pass  # indexed, in a view...: SQLite's DROP COLUMN refuses, copy the table
    if isinstance(ctx.conn, SqliteConnection):
        _online(ctx, op.table, Change(CopyKind.DROP_COLUMN, column=op.column), {})
        return
    with ctx.conn.transaction():
        ctx.conn.execute(f"ALTER TABLE {quote(op.table)} DROP COLUMN {quote(op.column)}")
        ctx.done({})


def _rename(ctx: OpContext, table: str, old: str, new: str) -> None:
    require_column(ctx.conn, table, old)
    if ctx.conn.column(table, new) is not None:
        raise OperationError(f"column {table}.{new} already exists")
    with ctx.conn.transaction():
        ctx.conn.execute(f"ALTER TABLE {quote(table)} RENAME COLUMN {quote(old)} TO {quote(new)}")
        ctx.done({})


# --- indexes -----------------------------------------------------------------------------


def _add_index(ctx: OpContext, op: AddIndex) -> None:
    conn = ctx.conn
    if op.online and isinstance(conn, SqliteConnection):
        change = Change(
            CopyKind.ADD_INDEX, index=op.name, index_columns=op.columns, unique=op.unique
        )
        if not _copy_pending(ctx, op.table):
            _check_new_index(conn, op)
        _online(ctx, op.table, change, {})
    elif op.online and isinstance(conn, PostgresConnection):
        _build_concurrently(ctx, conn, op)
    else:
        _check_new_index(conn, op)
        with conn.transaction():
            conn.execute(index_sql(op.name, op.table, op.columns, op.unique))
            ctx.done({})


def _check_new_index(conn: Connection, op: AddIndex) -> None:
    require_table(conn, op.table)
    for column in op.columns:
        require_column(conn, op.table, column)
    if conn.index_table(op.name) is not None:
        raise OperationError(f"index {op.name} already exists")


def _build_concurrently(ctx: OpContext, conn: PostgresConnection, op: AddIndex) -> None:
    """CREATE INDEX CONCURRENTLY runs outside a transaction; the build is recorded first,
    so if it dies midway the INVALID index it leaves is dropped and built again."""
    recorded = conn.scalar(f"SELECT step FROM {ONLINE} WHERE name = ?", (op.name,))
    if recorded is None:
        _check_new_index(conn, op)
        with conn.transaction():
            conn.execute(
                f"INSERT INTO {ONLINE} (name, tbl, version, op_index, step, last_key, spec)"
                " VALUES (?, ?, ?, ?, ?, NULL, '{}')",
                (op.name, op.table, ctx.version, ctx.op_index, str(Step.BUILDING)),
            )
        ctx.tuning.fault("index.recorded")
    existing = next((ix for ix in conn.indexes(op.table) if ix.name == op.name), None)
    with conn.patient():
        if existing is not None and not existing.valid:
            conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(op.name)}")
            existing = None
        if existing is None:
            _create_concurrently(conn, op)
    ctx.tuning.fault("index.built")
    with conn.transaction():
        conn.execute(f"DELETE FROM {ONLINE} WHERE name = ?", (op.name,))
        ctx.done({})


def _create_concurrently(conn: PostgresConnection, op: AddIndex) -> None:
    kind = "UNIQUE INDEX" if op.unique else "INDEX"
    try:
        conn.execute(
            f"CREATE {kind} CONCURRENTLY {quote(op.name)} ON {quote(op.table)}"
            f" ({qlist(op.columns)})"
        )
    except Exception:
        # A failed concurrent build leaves an INVALID index behind: remove it.
        conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(op.name)}")
        _forget(conn, op.name)
        raise


def _drop_index(ctx: OpContext, op: AddIndex) -> None:
    conn = ctx.conn
    if op.online and isinstance(conn, PostgresConnection):
        with conn.patient():
            conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(op.name)}")
        with conn.transaction():
            ctx.done({})
        return
    with conn.transaction():
        conn.execute(f"DROP INDEX IF EXISTS {quote(op.name)}")
        ctx.done({})


def _forget(conn: Connection, name: str) -> None:
    with conn.transaction():
        conn.execute(f"DELETE FROM {ONLINE} WHERE name = ?", (name,))


# --- type changes ------------------------------------------------------------------------


def _change_type(ctx: OpContext, table: str, column: str, new_type: str, online: bool) -> None:
    conn = ctx.conn
    if not _copy_pending(ctx, table):
        require_column(conn, table, column)
    info = conn.column(table, column)
    undo = {"old_type": info.type if info else ""}
    if isinstance(conn, SqliteConnection) or online:
        _online(ctx, table, Change(CopyKind.CHANGE_TYPE, column=column, new_type=new_type), undo)
        return
    # PostgreSQL, not online: one blocking ALTER, after the same round-trip check.
    shadow = PostgresShadow(cast(PostgresConnection, conn))
    with conn.transaction():
        lossy = conn.query(shadow.lossless_check(table, column, new_type, undo["old_type"]))
        if lossy:
            raise OperationError(
                f"{table}.{column}: the value at key {list(lossy[0])} does not convert to"
                f" {new_type} and back unchanged"
            )
        if info is not None:
            conn.execute(alter_type_sql(table, info, new_type))
        ctx.done(undo)


# --- online copies -----------------------------------------------------------------------


def shadow_for(conn: Connection) -> SqliteShadow | PostgresShadow:
    if conn.dialect is Dialect.SQLITE:
        return SqliteShadow(cast(SqliteConnection, conn))
    return PostgresShadow(cast(PostgresConnection, conn))


def _copy_pending(ctx: OpContext, table: str, owner: str = "migration") -> bool:
    """A crashed run left this table's online copy part-way (resume goes on with it)."""
    shadow, _old = names_for(table, ctx.version, ctx.op_index, owner)
    step = ctx.conn.scalar(f"SELECT step FROM {ONLINE} WHERE name = ?", (shadow,))
    return step is not None and step != Step.SWAPPED


def _online(ctx: OpContext, table: str, change: Change, undo: Undo) -> Plan:
    shadow = shadow_for(ctx.conn)

    def make_plan() -> Plan:
        return shadow.plan(table, ctx.version, ctx.op_index, "migration", change)

    name, _old = names_for(table, ctx.version, ctx.op_index, "migration")
    return OnlineCopy(shadow, ctx.tuning).run(name, make_plan, lambda: ctx.done(undo))


# --- custom ------------------------------------------------------------------------------


def _custom(ctx: OpContext, op: Custom, *, undo: bool) -> None:
    try:
        plugin = plugin_for(ctx.plugins(), op)
    except LookupError as exc:
        raise OperationError(str(exc)) from None
    with ctx.conn.transaction():
        if undo:
            plugin.rollback(ctx.conn, op)
        else:
            plugin.apply(ctx.conn, op)
        ctx.done({"plugin": plugin.name, "plugin_version": str(plugin.version)})
