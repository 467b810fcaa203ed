"""SQLite's side of online DDL (see online.py).

SQLite has one writer at a time, so "online" means every write transaction of ours is
short: the shadow is made empty with all its indexes, filled in chunks, and swapped with
renames. Three SQLite facts shape the rest:

- The shadow's CREATE TABLE is rebuilt from the catalog (columns, types, NOT NULL,
  constant defaults, primary key, UNIQUE, foreign keys). What that cannot reproduce
  (CHECK, COLLATE, AUTOINCREMENT, generated columns, WITHOUT ROWID, STRICT, ON CONFLICT
  clauses, deferrable keys, expression or partial indexes, triggers of the application)
  is refused, and the shadow is compared with the original before anything is copied.
- Index names are global and cannot be renamed, and building an index on a large table
  holds the write lock for its whole duration (≈ 0.4 s per million rows). So the shadow's
  indexes are built empty under temporary names and filled as rows arrive; at the swap the
  catalog rows of both tables' indexes are renamed in place (PRAGMA writable_schema, the
  documented procedure for metadata-only schema changes: same transaction, schema cookie
  bumped). Both tables' index definitions are rebuilt from plain column lists, so the text
  written matches the b-tree it names.
- The swap runs with legacy_alter_table on: views, triggers and foreign keys of other
  tables keep naming the table, and so reach the new one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .connection import ColumnInfo, IndexInfo, SqliteConnection
from .online import ColumnMap, CopyKind, OperationError, Plan, Rename, names_for
from .sql import aux_name, qlist, quote, safe_default, safe_type

_UNSUPPORTED = (
    "CHECK", "COLLATE", "AUTOINCREMENT", "GENERATED", "WITHOUT", "STRICT", "CONFLICT",
    "DEFERRABLE",
)  # fmt: skip
_FK_ACTIONS = {"NO ACTION", "CASCADE", "SET NULL", "SET DEFAULT", "RESTRICT"}
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]")


@dataclass(frozen=True)
class Change:
    """What the copy changes: a column's type, a dropped column, or an added index."""

    kind: CopyKind
    column: str = ""
    new_type: str = ""
    index: str = ""
    index_columns: tuple[str, ...] = ()
    unique: bool = False


def index_sql(name: str, table: str, columns: tuple[str, ...] | list[str], unique: bool) -> str:
    kind = "UNIQUE INDEX" if unique else "INDEX"
    return f"CREATE {kind} {quote(name)} ON {quote(table)} ({qlist(list(columns))})"


class SqliteShadow:
    def __init__(self, conn: SqliteConnection) -> None:
        self.conn = conn

    # --- the plan ----------------------------------------------------------------------

    def plan(self, table: str, version: str, op_index: int, owner: str, change: Change) -> Plan:
        self._refuse_unsupported(table)
        shadow, old = names_for(table, version, op_index, owner)
        columns = self.conn.columns(table)
        key, copy_rowid = _key(columns)
        if change.column and change.column in key:
            raise OperationError(f"{table}.{change.column} is the table's key: not changed online")
        maps, defs, expect, old_type = self._columns(table, columns, change)
        indexes = self.conn.indexes(table)
        _refuse_indexes_on_dropped(table, indexes, change)
        constraints = self._constraints(table, columns, indexes, change)
        create = [f"CREATE TABLE {quote(shadow)} ({', '.join(defs + constraints)})"]
        renames = []
        for i, ix in enumerate(ix for ix in indexes if ix.origin == "c"):
            temp = aux_name("_themis_ix", table, version, str(i))
            parked = aux_name("_themis_ox", table, version, str(i))
            create.append(index_sql(temp, shadow, ix.columns, ix.unique))
            renames.append(
                Rename(
                    final=ix.name, temp=temp, parked=parked,
                    final_sql=index_sql(ix.name, table, ix.columns, ix.unique),
                    parked_sql=index_sql(parked, old, ix.columns, ix.unique),
                )
            )  # fmt: skip
        if change.kind is CopyKind.ADD_INDEX:
            create.append(index_sql(change.index, shadow, change.index_columns, change.unique))
        triggers = [aux_name(f"_themis_sync{c}", table, version) for c in "iud"]
        return Plan(
            kind=change.kind, table=table, version=version, op_index=op_index, owner=owner,
            shadow=shadow, old=old, key=key, copy_rowid=copy_rowid, columns=maps,
            create_sql=create, renames=renames, triggers=triggers,
            changed=change.column if change.kind is CopyKind.CHANGE_TYPE else "",
            old_type=old_type, expect=expect,
            expect_indexes=_index_shapes(indexes, change),
        )  # fmt: skip

    def _refuse_unsupported(self, table: str) -> None:
        sql = self.conn.scalar(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?", (table,)
        )
        if sql is None:
            raise OperationError(f"table {table} does not exist")
        words = set(re.findall(r"[A-Z_]+", _QUOTED.sub(" ", str(sql)).upper()))
        found = [w for w in _UNSUPPORTED if w in words]
        if found:
            raise OperationError(f"table {table} uses {found[0]}: the online copy cannot keep it")
        triggers = self.conn.query(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?", (table,)
        )
        if triggers:
            raise OperationError(f"table {table} has trigger {triggers[0][0]}: not copied online")

    def _columns(
        self, table: str, columns: list[ColumnInfo], change: Change
    ) -> tuple[list[ColumnMap], list[str], list[list[Any]], str]:
        maps, defs, expect, old_type = [], [], [], ""
        for col in columns:
            if col.special:
                raise OperationError(f"{table}.{col.name} is a generated column: not copied online")
            if change.kind is CopyKind.DROP_COLUMN and col.name == change.column:
                continue
            type_, cast = col.type, None
            if change.kind is CopyKind.CHANGE_TYPE and col.name == change.column:
                old_type, type_, cast = col.type, change.new_type, change.new_type
            if not safe_type(type_):
                raise OperationError(f"{table}.{col.name}: type {type_!r} not copied online")
            if col.default is not None and not safe_default(col.default):
                raise OperationError(
                    f"{table}.{col.name}: default {col.default!r} is not a constant"
                )
            parts = [quote(col.name), type_, "NOT NULL" if col.notnull else ""]
            if col.default is not None:
                parts.append(f"DEFAULT {col.default}")
            defs.append(" ".join(p for p in parts if p))
            maps.append(ColumnMap(col.name, col.name, cast))
            expect.append([col.name, type_, col.notnull, col.default, col.pk])
        if change.column and change.column not in {c.name for c in columns}:
            raise OperationError(f"column {table}.{change.column} does not exist")
        return maps, defs, expect, old_type

    def _constraints(
        self, table: str, columns: list[ColumnInfo], indexes: list[IndexInfo], change: Change
    ) -> list[str]:
        found = []
        pk = sorted((c for c in columns if c.pk), key=lambda c: c.pk)
        if pk:
            found.append(f"PRIMARY KEY ({qlist([c.name for c in pk])})")
        for ix in indexes:
            if not ix.plain:
                raise OperationError(f"index {ix.name} has expressions, a WHERE or a collation")
            if ix.origin == "u":
                found.append(f"UNIQUE ({qlist(list(ix.columns))})")
        return found + self._foreign_keys(table, change)

    def _foreign_keys(self, table: str, change: Change) -> list[str]:
        groups: dict[int, list[tuple[Any, ...]]] = {}
        for row in self.conn.query(f"PRAGMA foreign_key_list({quote(table)})"):
            groups.setdefault(int(row[0]), []).append(row)
        found = []
        for rows in groups.values():
            rows.sort(key=lambda r: int(r[1]))
            parent, on_update, on_delete, match = rows[0][2], rows[0][5], rows[0][6], rows[0][7]
            if on_update not in _FK_ACTIONS or on_delete not in _FK_ACTIONS or match != "NONE":
                raise OperationError(f"a foreign key of {table} has clauses not copied online")
            src = [str(r[3]) for r in rows]
            if change.kind is CopyKind.DROP_COLUMN and change.column in src:
                raise OperationError(f"{table}.{change.column} is part of a foreign key")
            dst = [r[4] for r in rows]
            target = quote(parent) + (f" ({qlist(dst)})" if all(dst) else "")
            found.append(
                f"FOREIGN KEY ({qlist(src)}) REFERENCES {target}"
                f" ON UPDATE {on_update} ON DELETE {on_delete}"
            )
        return found

    def check_shadow(self, plan: Plan) -> None:
        got = [[c.name, c.type, c.notnull, c.default, c.pk] for c in self.conn.columns(plan.shadow)]
        if got != plan.expect:
            raise OperationError(f"could not reproduce table {plan.table} (columns {got})")
        shapes = sorted(
            [list(ix.columns), ix.unique, ix.origin] for ix in self.conn.indexes(plan.shadow)
        )
        if shapes != sorted(plan.expect_indexes):
            raise OperationError(f"could not reproduce the indexes of {plan.table}")

    # --- triggers, chunks, verify ------------------------------------------------------

    def _key_match(self, plan: Plan, left: str, right: str) -> str:
        key = plan.key[0]
        column = "rowid" if key == "rowid" else quote(key)
        return f"{left}.{column} = {right}.{column}"

    def locked(self, transaction: Callable[[], None]) -> None:
        transaction()  # one writer at a time: the busy timeout is the wait

    def create_triggers(self, plan: Plan) -> None:
        target = f"{quote(plan.shadow)} ({_columns_sql(plan)})"
        values = ", ".join(plan.source_exprs("NEW"))
        upsert = f"INSERT OR REPLACE INTO {target} VALUES ({values});"
        key = plan.key[0]
        column = "rowid" if key == "rowid" else quote(key)
        delete = f"DELETE FROM {quote(plan.shadow)} WHERE {column} = OLD.{column};"
        bodies = {"INSERT": upsert, "UPDATE": delete + " " + upsert, "DELETE": delete}
        for name, (event, body) in zip(plan.triggers, bodies.items(), strict=True):
            self.conn.execute(
                f"CREATE TRIGGER {quote(name)} AFTER {event} ON {quote(plan.table)}"
                f" BEGIN {body} END"
            )

    def drop_triggers(self, plan: Plan) -> None:
        for name in plan.triggers:
            self.conn.execute(f"DROP TRIGGER IF EXISTS {quote(name)}")

    def chunk_insert_sql(self, plan: Plan, where: str) -> str:
        exists = f"SELECT 1 FROM {quote(plan.shadow)} AS s WHERE {self._key_match(plan, 's', 'o')}"
        return (
            f"INSERT INTO {quote(plan.shadow)} ({_columns_sql(plan)})"
            f" SELECT {', '.join(plan.source_exprs('o'))} FROM {quote(plan.table)} AS o"
            f" WHERE {where} AND NOT EXISTS ({exists})"
        )

    def checksum_sql(self, exprs: list[str], table: str) -> str:
        return f"SELECT count(*), themis_checksum({', '.join(exprs)}) FROM {table}"

    def lossless_sql(self, plan: Plan) -> str:
        col = next(c for c in plan.columns if c.name == plan.changed)
        src = f"o.{quote(col.source)}"
        there = f"CAST({src} AS {col.cast})"
        back = f"CAST({there} AS {plan.old_type})" if plan.old_type else there
        key = "o.rowid" if plan.key[0] == "rowid" else f"o.{quote(plan.key[0])}"
        return (
            f"SELECT {key} FROM {quote(plan.table)} AS o"
            f" WHERE {src} IS NOT NULL AND {back} IS NOT {src} LIMIT 1"
        )

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        # A deferred read transaction: one WAL snapshot for every query inside, and
        # writers are not blocked.
        self.conn.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    # --- swap and drop -----------------------------------------------------------------

    def swap(self, plan: Plan, finish: Callable[[], None]) -> None:
        self.conn.execute("PRAGMA legacy_alter_table = ON")
        try:
            with self.conn.transaction():
                self.drop_triggers(plan)
                self.conn.execute(f"ALTER TABLE {quote(plan.table)} RENAME TO {quote(plan.old)}")
                self.conn.execute(f"ALTER TABLE {quote(plan.shadow)} RENAME TO {quote(plan.table)}")
                if plan.renames:
                    self._rename_indexes(plan)
                finish()
        finally:
            self.conn.reopen()  # also resets legacy_alter_table and writable_schema

    def _rename_indexes(self, plan: Plan) -> None:
        self.conn.execute("PRAGMA writable_schema = ON")
        for r in plan.renames:
            self._rename_index(r.final, plan.old, r.parked, r.parked_sql)
            self._rename_index(r.temp, plan.table, r.final, r.final_sql)
        self.conn.execute("PRAGMA writable_schema = OFF")
        cookie = int(self.conn.scalar("PRAGMA schema_version"))
        self.conn.execute(f"PRAGMA schema_version = {cookie + 1}")

    def _rename_index(self, name: str, table: str, new_name: str, new_sql: str) -> None:
        self.conn.execute(
            "UPDATE sqlite_schema SET name = ?, sql = ?"
            " WHERE type = 'index' AND name = ? AND tbl_name = ?",
            (new_name, new_sql, name, table),
        )
        if self.conn.changes() != 1:
            raise OperationError(f"swap: index {name} of {table} not found")

    def drop_table(self, name: str, chunk_rows: int, throttle: float) -> None:
        """Drop a big table without one long write lock: its rows in chunks (its indexes
        shrink with them), then the empty table. One DROP TABLE of a million rows holds
        the lock over 100 ms, one DROP INDEX about 40 ms, and both grow with the table."""
        if not self.conn.table_exists(name):
            return
        delete = (
            f"DELETE FROM {quote(name)} WHERE rowid IN (SELECT rowid FROM {quote(name)} LIMIT ?)"
        )
        while True:
            with self.conn.transaction():
                self.conn.execute(delete, (chunk_rows,))
                done = self.conn.changes() == 0
                if done:
                    self.conn.execute(f"DROP TABLE {quote(name)}")
            if done:
                return
            if throttle > 0:
                time.sleep(throttle)


def _key(columns: list[ColumnInfo]) -> tuple[list[str], bool]:
    """Chunk by the INTEGER PRIMARY KEY (the rowid's alias), else by rowid carried
    explicitly so every row keeps it."""
    pk = [c for c in columns if c.pk]
    if len(pk) == 1 and pk[0].type.upper() == "INTEGER":
        return [pk[0].name], False
    return ["rowid"], True


def _columns_sql(plan: Plan) -> str:
    return ", ".join("rowid" if c == "rowid" else quote(c) for c in plan.target_columns())


def _refuse_indexes_on_dropped(table: str, indexes: list[IndexInfo], change: Change) -> None:
    if change.kind is not CopyKind.DROP_COLUMN:
        return
    for ix in indexes:
        if change.column in ix.columns:
            raise OperationError(f"{table}.{change.column} is in index {ix.name}")


def _index_shapes(indexes: list[IndexInfo], change: Change) -> list[list[Any]]:
    shapes = [[list(ix.columns), ix.unique, ix.origin] for ix in indexes]
    if change.kind is CopyKind.ADD_INDEX:
        shapes.append([list(change.index_columns), change.unique, "c"])
    return shapes
