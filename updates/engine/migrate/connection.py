"""The node database behind one small interface: SQLite (WAL, busy timeout) or
PostgreSQL (psycopg 3), both in autocommit with explicit transactions, so statements that
must run outside one (CREATE INDEX CONCURRENTLY) can, and everything else is grouped
where it must be all-or-nothing.

Statements use `?` placeholders on both dialects. Migration plugins get a `Connection`.
"""

from __future__ import annotations

import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from ..errors import UsageError
from .model import ColumnType
from .sql import quote

DATABASE_URL_ENV = "THEMIS_NODE_DATABASE_URL"
BUSY_TIMEOUT_MS = 30_000
# A DDL statement waiting for a lock queues every later writer behind it on PostgreSQL:
# give up after this long rather than stall the service.
LOCK_TIMEOUT_MS = 5_000

Param = str | int | float | bool | bytes | None


class Dialect(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgresql"


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str  # as declared (SQLite) or format_type() (PostgreSQL)
    notnull: bool
    default: str | None  # SQL text of the default, as the catalog holds it
    pk: int  # position in the primary key, 0 if not part of it
    special: str = ""  # generated/identity kind; online copies refuse what they cannot copy


@dataclass(frozen=True)
class IndexInfo:
    name: str
    columns: tuple[str, ...]
    unique: bool
    origin: str  # "c" CREATE INDEX, "u" UNIQUE constraint, "pk" primary key
    sql: str | None  # the CREATE INDEX text from the catalog
    valid: bool = True  # PostgreSQL: false for a CONCURRENTLY build that died
    plain: bool = True  # no expressions, partial WHERE, collations or descending keys


def database_url_for(data_dir: Path) -> str:
    """The node database: THEMIS_NODE_DATABASE_URL if set, else SQLite in the data dir."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{data_dir}/themis.db"


class Connection(ABC):
    """One connection to the node database, in autocommit outside `transaction()`."""

    dialect: Dialect

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Param] = ()) -> None: ...

    @abstractmethod
    def query(self, sql: str, params: Sequence[Param] = ()) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def transaction(self) -> Any:
        """A context manager: everything inside commits together or not at all."""

    @property
    @abstractmethod
    def in_transaction(self) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def type_sql(self, type_: ColumnType) -> str: ...

    @abstractmethod
    def table_exists(self, table: str) -> bool: ...

    @abstractmethod
    def columns(self, table: str) -> list[ColumnInfo]: ...

    @abstractmethod
    def indexes(self, table: str) -> list[IndexInfo]: ...

    @abstractmethod
    def index_table(self, name: str) -> str | None:
        """The table an index of that name belongs to, None if there is none."""

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Many small commits whose loss in a power cut costs only their redoing (a
        backfill's chunks, each recording its progress): they skip the flush to disk, so
        they do not compete with the application's commits for it. The next ordinary
        commit (the swap) flushes them too: the log is written in order."""
        yield

    def reopen(self) -> None:  # noqa: B027  (a no-op unless the dialect needs it)
        """Start a fresh session (SQLite: re-read the schema after a swap)."""

    def scalar(self, sql: str, params: Sequence[Param] = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def column(self, table: str, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns(table) if c.name == name), None)


def connect(url: str) -> Connection:
    if url.startswith("sqlite:///"):
        return SqliteConnection(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresConnection(url)
    raise UsageError(f"database URL: expected sqlite:///PATH or postgresql://..., got {url!r}")


# --- SQLite -------------------------------------------------------------------------------

_SQLITE_TYPES = {
    ColumnType.INTEGER: "INTEGER",
    ColumnType.BIGINT: "BIGINT",
    ColumnType.TEXT: "TEXT",
    ColumnType.REAL: "REAL",
    ColumnType.NUMERIC: "NUMERIC",
    ColumnType.BOOLEAN: "BOOLEAN",
    ColumnType.TIMESTAMP: "TIMESTAMP",
    ColumnType.BLOB: "BLOB",
    ColumnType.BYTEA: "BLOB",
}


class _RowChecksum:
    """SQLite aggregate `themis_checksum(col, ...)`: an order-independent checksum of
    rows, the sum mod 2^64 of a 64-bit hash of each row's values with their types (so 1
    and 1.0 and '1' differ). Python's own hash: both tables are summed by the same process
    and compared there, and it costs a fraction of a cryptographic one per row, which
    matters at millions of rows."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, *values: Any) -> None:
        self.total += hash(tuple((v.__class__, v) for v in values))

    def finalize(self) -> str:
        return f"{self.total % (1 << 64):016x}"


class SqliteConnection(Connection):
    dialect = Dialect.SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self.raw = self._open()

    def _open(self) -> sqlite3.Connection:
        raw = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        raw.create_aggregate("themis_checksum", -1, cast(Any, _RowChecksum))
        return raw

    @contextmanager
    def bulk(self) -> Iterator[None]:
        previous = int(self.raw.execute("PRAGMA synchronous").fetchone()[0])
        self.raw.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync per commit
        try:
            yield
        finally:
            self.raw.execute(f"PRAGMA synchronous = {previous}")

    def reopen(self) -> None:
        # A swap renames index entries in sqlite_schema directly; this connection's parsed
        # schema predates that, other connections re-read it on their next statement.
        self.raw.close()
        self.raw = self._open()

    def changes(self) -> int:
        return int(self.raw.execute("SELECT changes()").fetchone()[0])

    def execute(self, sql: str, params: Sequence[Param] = ()) -> None:
        self.raw.execute(sql, tuple(params))

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[tuple[Any, ...]]:
        return list(self.raw.execute(sql, tuple(params)).fetchall())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        # IMMEDIATE: take the write lock at BEGIN, so a transaction never fails half-way
        # on a lock upgrade; other writers wait (busy_timeout) only while it runs.
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.raw.in_transaction:
                self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def close(self) -> None:
        self.raw.close()

    def type_sql(self, type_: ColumnType) -> str:
        return _SQLITE_TYPES[type_]

    def table_exists(self, table: str) -> bool:
        sql = "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?"
        return bool(self.query(sql, (table,)))

    def columns(self, table: str) -> list[ColumnInfo]:
        rows = self.query(f"PRAGMA table_xinfo({quote(table)})")
        return [
            ColumnInfo(
                name=r[1],
                type=r[2] or "",
                notnull=bool(r[3]),
                default=r[4],
                pk=int(r[5]),
                special="generated" if r[6] else "",
            )
            for r in rows
        ]

    def indexes(self, table: str) -> list[IndexInfo]:
        found = []
        for _seq, name, unique, origin, partial in self.query(f"PRAGMA index_list({quote(table)})"):
            keys = [r for r in self.query(f"PRAGMA index_xinfo({quote(name)})") if r[5]]
            sql = self.scalar("SELECT sql FROM sqlite_schema WHERE name = ?", (name,))
            plain = not partial and all(k[2] is not None and not k[3] for k in keys)
            plain = plain and all(str(k[4]).upper() == "BINARY" for k in keys)
            columns = tuple(str(k[2]) for k in keys)
            found.append(IndexInfo(name, columns, bool(unique), origin, sql, True, plain))
        return found

    def index_table(self, name: str) -> str | None:
        sql = "SELECT tbl_name FROM sqlite_schema WHERE type = 'index' AND name = ?"
        value = self.scalar(sql, (name,))
        return str(value) if value is not None else None


# --- PostgreSQL ---------------------------------------------------------------------------

_PG_TYPES = {
    ColumnType.INTEGER: "integer",
    ColumnType.BIGINT: "bigint",
    ColumnType.TEXT: "text",
    ColumnType.REAL: "double precision",
    ColumnType.NUMERIC: "numeric",
    ColumnType.BOOLEAN: "boolean",
    ColumnType.TIMESTAMP: "timestamp with time zone",
    ColumnType.BLOB: "bytea",
    ColumnType.BYTEA: "bytea",
}


def to_pyformat(sql: str) -> str:
    """`?` placeholders to psycopg's `%s`; `%` doubled, since psycopg reads every `%`.
    A `?` inside a quoted literal or name stays as it is."""
    out = []
    quote_char = ""
    for ch in sql:
        if ch == "%":
            out.append("%%")
            continue
        if quote_char:
            quote_char = "" if ch == quote_char else quote_char
        elif ch in "'\"":
            quote_char = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


_PG_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid),
       coalesce((SELECT k.ord FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                 WHERE k.attnum = a.attnum), 0),
       concat_ws(' ', nullif(a.attidentity, ''), nullif(a.attgenerated, ''))
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = ?::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PG_INDEXES = """
SELECT c.relname, i.indisunique, i.indisvalid,
       CASE WHEN i.indisprimary THEN 'pk'
            WHEN con.contype IS NOT NULL THEN 'u' ELSE 'c' END,
       pg_get_indexdef(i.indexrelid),
       i.indexprs IS NULL AND i.indpred IS NULL,
       (SELECT array_agg(a.attname ORDER BY k.ord)
          FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('u', 'p', 'x')
WHERE i.indrelid = ?::regclass
ORDER BY c.relname
"""


class PostgresConnection(Connection):
    dialect = Dialect.POSTGRES

    def __init__(self, url: str) -> None:
        import psycopg  # only nodes on PostgreSQL need the driver loaded

        self.raw = psycopg.connect(url, autocommit=True)
        self.raw.execute("SET standard_conforming_strings = on")
        self.raw.execute("SET TimeZone = 'UTC'")
        self.raw.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    def execute(self, sql: str, params: Sequence[Param] = ()) -> None:
        if params:
            self.raw.execute(to_pyformat(sql).encode(), tuple(params))
        else:
            self.raw.execute(sql.encode())

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[tuple[Any, ...]]:
        if params:
            cur = self.raw.execute(to_pyformat(sql).encode(), tuple(params))
        else:
            cur = self.raw.execute(sql.encode())
        return list(cur.fetchall()) if cur.description else []

    def transaction(self) -> Any:
        return self.raw.transaction()

    @contextmanager
    def patient(self) -> Iterator[None]:
        """No lock_timeout: for CREATE/DROP INDEX CONCURRENTLY, whose waits for older
        transactions block no writer (and would otherwise fail it)."""
        self.raw.execute("SET lock_timeout = 0")
        try:
            yield
        finally:
            self.raw.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    @contextmanager
    def bulk(self) -> Iterator[None]:
        self.raw.execute("SET synchronous_commit = off")
        try:
            yield
        finally:
            self.raw.execute("SET synchronous_commit = DEFAULT")

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()

    def type_sql(self, type_: ColumnType) -> str:
        return _PG_TYPES[type_]

    def table_exists(self, table: str) -> bool:
        sql = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass(?)"
        return self.scalar(sql, (quote(table),)) in ("r", "p")

    def columns(self, table: str) -> list[ColumnInfo]:
        rows = self.query(_PG_COLUMNS, (quote(table),))
        return [ColumnInfo(r[0], r[1], bool(r[2]), r[3], int(r[4]), r[5] or "") for r in rows]

    def indexes(self, table: str) -> list[IndexInfo]:
        found = []
        for name, unique, valid, origin, sql, plain, cols in self.query(
            _PG_INDEXES, (quote(table),)
        ):
            columns = tuple(cols or ())
            found.append(IndexInfo(name, columns, unique, origin, sql, valid, bool(plain)))
        return found

    def index_table(self, name: str) -> str | None:
        sql = """SELECT t.relname FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                 WHERE i.indexrelid = to_regclass(?)"""
        value = self.scalar(sql, (quote(name),))
        return str(value) if value is not None else None
