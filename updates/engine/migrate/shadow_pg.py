"""PostgreSQL's side of online DDL (see online.py): a type change by copy.

The shadow is `CREATE TABLE ... (LIKE original INCLUDING DEFAULTS, CONSTRAINTS, STORAGE,
COMMENTS)`, the column's new type set while it is empty, then the original's primary key,
unique and exclusion constraints, other indexes and foreign keys added under temporary
names (the definitions come from PostgreSQL's own deparser: pg_get_constraintdef,
pg_get_indexdef), and its grants repeated. Dual write is one PL/pgSQL trigger. Each backfill
chunk reads its rows FOR SHARE, so a concurrent delete or update of a row waits for the
chunk or is seen by it (never a stale row copied after its trigger ran). Verification runs on
one REPEATABLE READ snapshot. The swap takes ACCESS EXCLUSIVE (bounded by lock_timeout),
renames tables, indexes and constraints, and hands the serial sequence (or the identity's
next value) to the new table.

Refused, before anything changes: no primary key, foreign keys of other tables pointing at
the table or views over it (they follow the old table by OID), triggers of the
application, generated columns, GENERATED ALWAYS identities, partitions or inheritance.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .connection import ColumnInfo, PostgresConnection
from .online import ColumnMap, CopyKind, OperationError, Plan, Rename, names_for
from .shadow_sqlite import Change
from .sql import aux_name, qlist, quote, safe_default

_INDEXDEF = re.compile(r"CREATE (UNIQUE )?INDEX (\S+) ON (ONLY )?(\S+) USING (.+)", re.DOTALL)
LOCK_ATTEMPTS = 5
_SEQUENCE = re.compile(r'[A-Za-z0-9_."]{1,200}')


def retrying(step: Callable[[], None]) -> None:
    """Run a transaction that locks the live table (triggers, swap, their removal). Each
    attempt waits for the lock at most lock_timeout, so a long transaction of the
    application never queues every writer behind ours; a few attempts, then the error."""
    import psycopg

    for attempt in range(LOCK_ATTEMPTS):
        try:
            step()
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == LOCK_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}


def alter_type_sql(table: str, column: ColumnInfo, new_type: str) -> str:
    """ALTER COLUMN TYPE, its default converted too: PostgreSQL would refuse to cast
    `'0'::text` to bigint by itself. Only a plain constant default is carried over."""
    name = quote(column.name)
    change = f"ALTER COLUMN {name} TYPE {new_type} USING CAST({name} AS {new_type})"
    if column.default is None:
        return f"ALTER TABLE {quote(table)} {change}"
    if not safe_default(column.default):
        raise OperationError(f"{table}.{column.name}: default {column.default!r} is not a constant")
    return (
        f"ALTER TABLE {quote(table)} ALTER COLUMN {name} DROP DEFAULT, {change},"
        f" ALTER COLUMN {name} SET DEFAULT CAST({column.default} AS {new_type})"
    )


def _short(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:10]


class PostgresShadow:
    def __init__(self, conn: PostgresConnection) -> None:
        self.conn = conn

    # --- the plan ----------------------------------------------------------------------

    def plan(self, table: str, version: str, op_index: int, owner: str, change: Change) -> Plan:
        if change.kind is not CopyKind.CHANGE_TYPE:
            raise OperationError(f"PostgreSQL needs no table copy for {change.kind}")
        self._refuse_unsupported(table)
        shadow, old = names_for(table, version, op_index, owner)
        columns = self.conn.columns(table)
        key = [c.name for c in sorted((c for c in columns if c.pk), key=lambda c: c.pk)]
        if not key:
            raise OperationError(f"table {table} has no primary key: not copied online")
        if change.column in key:
            raise OperationError(f"{table}.{change.column} is the table's key: not changed online")
        target = next((c for c in columns if c.name == change.column), None)
        if target is None:
            raise OperationError(f"column {table}.{change.column} does not exist")
        maps = [
            ColumnMap(c.name, c.name, change.new_type if c.name == change.column else None)
            for c in columns
        ]
        tag = _short(table, version, owner)
        create = [
            f"CREATE TABLE {quote(shadow)} (LIKE {quote(table)} INCLUDING DEFAULTS"
            " INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS)",
            alter_type_sql(shadow, target, change.new_type),
        ]
        renames = self._constraints(table, shadow, tag, create)
        renames += self._indexes(table, shadow, tag, create)
        create += self._grants(table, shadow)
        return Plan(
            kind=change.kind, table=table, version=version, op_index=op_index, owner=owner,
            shadow=shadow, old=old, key=key, copy_rowid=False, columns=maps, create_sql=create,
            renames=renames, triggers=[aux_name("_themis_sync", tag)],
            function=aux_name("_themis_syncfn", tag), changed=change.column,
            old_type=target.type, sequences=self._sequences(table, columns),
            expect=[[c.name, m.cast or c.type] for c, m in zip(columns, maps, strict=True)],
        )  # fmt: skip

    def _refuse_unsupported(self, table: str) -> None:
        name = quote(table)
        checks = [
            ("SELECT relkind::text FROM pg_class WHERE oid = ?::regclass AND relkind <> 'r'",
             "is not a plain table"),
            ("SELECT inhrelid::regclass::text FROM pg_inherits"
             " WHERE inhparent = ?::regclass OR inhrelid = ?::regclass", "has inheritance"),
            ("SELECT conname FROM pg_constraint WHERE confrelid = ?::regclass AND contype = 'f'"
             " AND conrelid <> confrelid", "is referenced by foreign key"),
            ("SELECT DISTINCT v.relname FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid"
             " JOIN pg_class v ON v.oid = r.ev_class"
             " WHERE d.refobjid = ?::regclass AND v.oid <> d.refobjid", "is used by view"),
            ("SELECT tgname FROM pg_trigger WHERE tgrelid = ?::regclass AND NOT tgisinternal",
             "has trigger"),
            ("SELECT conname FROM pg_constraint WHERE conrelid = ?::regclass AND contype = 't'",
             "has constraint trigger"),
        ]  # fmt: skip
        for sql, problem in checks:
            rows = self.conn.query(sql, [name] * sql.count("?"))
            if rows:
                raise OperationError(f"table {table} {problem} {rows[0][0]}: not copied online")
        for col in self.conn.columns(table):
            if "s" in col.special.split() or "a" in col.special.split():
                raise OperationError(f"{table}.{col.name} is generated: not copied online")

    def _constraints(self, table: str, shadow: str, tag: str, create: list[str]) -> list[Rename]:
        """Primary key, unique, exclusion (index-backed: temporary names, renamed at the
        swap) and foreign keys (per-table names: the same name)."""
        rows = self.conn.query(
            "SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = ?::regclass AND contype IN ('p', 'u', 'x', 'f') ORDER BY conname",
            (quote(table),),
        )
        renames = []
        for i, (name, kind, definition) in enumerate(rows):
            if kind == "f":
                create.append(
                    f"ALTER TABLE {quote(shadow)} ADD CONSTRAINT {quote(name)} {definition}"
                )
                continue
            temp = aux_name("_themis_c", tag, str(i))
            create.append(f"ALTER TABLE {quote(shadow)} ADD CONSTRAINT {quote(temp)} {definition}")
            parked = aux_name("_themis_oc", tag, str(i))
            renames.append(Rename(final=name, temp=temp, parked=parked, kind="constraint"))
        return renames

    def _indexes(self, table: str, shadow: str, tag: str, create: list[str]) -> list[Rename]:
        renames = []
        for i, ix in enumerate(ix for ix in self.conn.indexes(table) if ix.origin == "c"):
            match = _INDEXDEF.fullmatch(ix.sql or "")
            if not ix.valid or match is None:
                raise OperationError(f"index {ix.name} of {table} is invalid or not reproducible")
            temp = aux_name("_themis_ix", tag, str(i))
            unique = "UNIQUE " if match.group(1) else ""
            create.append(
                f"CREATE {unique}INDEX {quote(temp)} ON {quote(shadow)} USING {match.group(5)}"
            )
            renames.append(
                Rename(final=ix.name, temp=temp, parked=aux_name("_themis_ox", tag, str(i)))
            )
        return renames

    def _grants(self, table: str, shadow: str) -> list[str]:
        rows = self.conn.query(
            """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type, pg_get_userbyid(c.relowner), current_user::text
               FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
               WHERE c.oid = ?::regclass""",
            (quote(table),),
        )
        found = []
        for grantee, privilege, _owner, _me in rows:
            if privilege not in _PRIVILEGES:
                raise OperationError(f"{table}: grant {privilege} not copied online")
            who = "PUBLIC" if grantee == "PUBLIC" else quote(grantee)
            found.append(f"GRANT {privilege} ON {quote(shadow)} TO {who}")
        if rows and rows[0][2] != rows[0][3]:
            found.append(f"ALTER TABLE {quote(shadow)} OWNER TO {quote(rows[0][2])}")
        return found

    def _sequences(self, table: str, columns: list[ColumnInfo]) -> list[dict[str, str]]:
        found = []
        for col in columns:
            seq = self.conn.scalar("SELECT pg_get_serial_sequence(?, ?)", (quote(table), col.name))
            if seq is None:
                continue
            if not _SEQUENCE.fullmatch(str(seq)):  # written into ALTER SEQUENCE below
                raise OperationError(f"{table}.{col.name}: sequence {seq!r} not copied online")
            kind = "identity" if "d" in col.special.split() else "serial"
            found.append({"column": col.name, "sequence": str(seq), "kind": kind})
        return found

    def check_shadow(self, plan: Plan) -> None:
        got = [[c.name, c.type] for c in self.conn.columns(plan.shadow)]
        if got != plan.expect:
            raise OperationError(f"could not reproduce table {plan.table} (columns {got})")

    # --- triggers, chunks, verify ------------------------------------------------------

    def locked(self, transaction: Callable[[], None]) -> None:
        retrying(transaction)

    def create_triggers(self, plan: Plan) -> None:
        key = qlist(plan.key)
        old_key = ", ".join(f"OLD.{quote(k)}" for k in plan.key)
        cols = qlist(plan.target_columns())
        values = ", ".join(plan.source_exprs("NEW"))
        rest = [c.name for c in plan.columns if c.name not in plan.key]
        conflict = (
            "DO UPDATE SET " + ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in rest)
            if rest
            else "DO NOTHING"
        )
        body = (
            f"BEGIN IF TG_OP <> 'INSERT' THEN DELETE FROM {quote(plan.shadow)} WHERE ({key}) ="
            f" ({old_key}); END IF; IF TG_OP <> 'DELETE' THEN INSERT INTO {quote(plan.shadow)}"
            f" ({cols}) VALUES ({values}) ON CONFLICT ({key}) {conflict}; END IF; RETURN NULL;"
            " END"
        )
        if "$themis$" in body:
            raise OperationError(f"{plan.table}: a column name breaks the trigger's quoting")
        self.conn.execute(
            f"CREATE FUNCTION {quote(plan.function)}() RETURNS trigger LANGUAGE plpgsql"
            f" AS $themis${body}$themis$"
        )
        self.conn.execute(
            f"CREATE TRIGGER {quote(plan.triggers[0])} AFTER INSERT OR UPDATE OR DELETE"
            f" ON {quote(plan.table)} FOR EACH ROW EXECUTE FUNCTION {quote(plan.function)}()"
        )

    def drop_triggers(self, plan: Plan) -> None:
        if self.conn.table_exists(plan.table):
            self.conn.execute(
                f"DROP TRIGGER IF EXISTS {quote(plan.triggers[0])} ON {quote(plan.table)}"
            )
        if self.conn.table_exists(plan.old):
            self.conn.execute(
                f"DROP TRIGGER IF EXISTS {quote(plan.triggers[0])} ON {quote(plan.old)}"
            )
        self.conn.execute(f"DROP FUNCTION IF EXISTS {quote(plan.function)}()")

    def chunk_insert_sql(self, plan: Plan, where: str) -> str:
        key = qlist(plan.key)
        rows = (
            f"SELECT * FROM {quote(plan.table)} AS o WHERE {where}"
            f" ORDER BY {', '.join(f'o.{quote(k)}' for k in plan.key)} FOR SHARE"
        )
        return (
            f"INSERT INTO {quote(plan.shadow)} ({qlist(plan.target_columns())})"
            f" SELECT {', '.join(plan.source_exprs('o'))} FROM ({rows}) AS o"
            f" ON CONFLICT ({key}) DO NOTHING"
        )

    def checksum_sql(self, exprs: list[str], table: str) -> str:
        row_hash = f"('x' || substr(md5(ROW({', '.join(exprs)})::text), 1, 15))::bit(60)::bigint"
        return f"SELECT count(*), coalesce(sum({row_hash}), 0)::text FROM {table}"

    def lossless_sql(self, plan: Plan) -> str:
        col = next(c for c in plan.columns if c.name == plan.changed)
        return self.lossless_check(plan.table, col.source, str(col.cast), plan.old_type, plan.key)

    def lossless_check(
        self, table: str, column: str, new_type: str, old_type: str, key: list[str] | None = None
    ) -> str:
        src = f"o.{quote(column)}"
        back = f"CAST(CAST({src} AS {new_type}) AS {old_type})"
        shown = ", ".join(f"o.{quote(k)}" for k in key) if key else "o.ctid::text"
        return (
            f"SELECT {shown} FROM {quote(table)} AS o"
            f" WHERE {src} IS NOT NULL AND {back} IS DISTINCT FROM {src} LIMIT 1"
        )

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    # --- swap and drop -----------------------------------------------------------------

    def swap(self, plan: Plan, finish: Callable[[], None]) -> None:
        retrying(lambda: self._swap_once(plan, finish))

    def _swap_once(self, plan: Plan, finish: Callable[[], None]) -> None:
        t, s, o = quote(plan.table), quote(plan.shadow), quote(plan.old)
        with self.conn.transaction():
            self.conn.execute(f"LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE")
            self.drop_triggers(plan)
            self.conn.execute(f"ALTER TABLE {t} RENAME TO {o}")
            self.conn.execute(f"ALTER TABLE {s} RENAME TO {t}")
            for r in plan.renames:
                self._rename(plan, r)
            for seq in plan.sequences:
                self._move_sequence(plan, seq)
            finish()

    def _rename(self, plan: Plan, r: Rename) -> None:
        if r.kind == "constraint":
            old, new = quote(plan.old), quote(plan.table)
            self.conn.execute(
                f"ALTER TABLE {old} RENAME CONSTRAINT {quote(r.final)} TO {quote(r.parked)}"
            )
            self.conn.execute(
                f"ALTER TABLE {new} RENAME CONSTRAINT {quote(r.temp)} TO {quote(r.final)}"
            )
        else:
            self.conn.execute(f"ALTER INDEX {quote(r.final)} RENAME TO {quote(r.parked)}")
            self.conn.execute(f"ALTER INDEX {quote(r.temp)} RENAME TO {quote(r.final)}")

    def _move_sequence(self, plan: Plan, seq: dict[str, Any]) -> None:
        col = quote(seq["column"])
        if seq["kind"] == "serial":
            # The new table's default already calls this sequence; make it the owner so
            # dropping the old table keeps the sequence.
            self.conn.execute(
                f"ALTER SEQUENCE {seq['sequence']} OWNED BY {quote(plan.table)}.{col}"
            )
            return
        last = self.conn.scalar("SELECT pg_sequence_last_value(?::regclass)", (seq["sequence"],))
        self.conn.execute(f"ALTER TABLE {quote(plan.old)} ALTER COLUMN {col} DROP IDENTITY")
        start = int(last) + 1 if last is not None else 1
        self.conn.execute(
            f"ALTER TABLE {quote(plan.table)} ALTER COLUMN {col}"
            f" ADD GENERATED BY DEFAULT AS IDENTITY (START WITH {start})"
        )

    def drop_table(self, name: str, chunk_rows: int, throttle: float) -> None:
        # Dropping a table is quick in PostgreSQL (its files are unlinked at commit).
        with self.conn.transaction():
            self.conn.execute(f"DROP TABLE IF EXISTS {quote(name)}")
