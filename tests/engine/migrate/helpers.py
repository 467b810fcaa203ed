"""Helpers for the migrator's tests: migrations from dicts, and the schema and rows of a
table read back through a connection of the test's own (not the migrator's)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from updates.engine.migrate import Migration, SchemaMigrator, parse_migration
from updates.engine.migrate.connection import Connection, Dialect, connect
from updates.engine.migrate.plugins import MigrationPlugin

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def mig_doc(version: str, ops: list[dict[str, Any]], phase: str = "expand") -> dict[str, Any]:
    return {"version": version, "phase": phase, "description": f"m{version}", "operations": ops}


def mig(version: str, ops: list[dict[str, Any]], phase: str = "expand") -> Migration:
    data = json.dumps(mig_doc(version, ops, phase)).encode()
    return parse_migration(data, name=f"migrations/{version}.json")


@dataclass(frozen=True)
class Schema:
    columns: tuple[tuple[str, str, bool, str | None], ...]
    indexes: tuple[tuple[str, tuple[str, ...], bool], ...]

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.columns]

    def type_of(self, column: str) -> str:
        return next(c[1] for c in self.columns if c[0] == column)


class Clock:
    """An injected clock: `now` for the migrator, moved by the test."""

    def __init__(self, start: datetime = T0) -> None:
        self.moment = start

    def __call__(self) -> datetime:
        return self.moment


@dataclass(frozen=True)
class Db:
    url: str
    state: Path

    @property
    def dialect(self) -> Dialect:
        return Dialect.SQLITE if self.url.startswith("sqlite") else Dialect.POSTGRES

    @property
    def sqlite(self) -> bool:
        return self.dialect is Dialect.SQLITE

    def migrator(self, plugins: Sequence[MigrationPlugin] | None = (), **kw: Any) -> SchemaMigrator:
        return SchemaMigrator(self.url, state_dir=self.state, plugins=plugins, **kw)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        conn = connect(self.url)
        try:
            yield conn
        finally:
            conn.close()

    def run(self, *statements: str) -> None:
        with self.connect() as conn:
            for sql in statements:
                conn.execute(sql)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.query(sql, params)

    def seed_orders(self, rows: int = 200) -> None:
        """orders(id, qty, amount TEXT, legacy, note) with `rows` rows."""
        self.run(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER, amount TEXT,"
            " legacy TEXT, note TEXT DEFAULT 'n')"
        )
        with self.connect() as conn, conn.transaction():
            for i in range(1, rows + 1):
                conn.execute(
                    "INSERT INTO orders (id, qty, amount, legacy, note) VALUES (?, ?, ?, ?, ?)",
                    (i, i % 7, str(i * 3), f"legacy-{i}", f"note {i}"),
                )

    def schema(self, table: str = "orders") -> Schema:
        with self.connect() as conn:
            cols = tuple(
                (c.name, c.type.upper(), c.notnull, c.default) for c in conn.columns(table)
            )
            ixs = tuple(
                sorted(
                    (ix.name, ix.columns, ix.unique)
                    for ix in conn.indexes(table)
                    if ix.origin == "c"
                )
            )
        return Schema(cols, ixs)

    def tables(self) -> set[str]:
        if self.sqlite:
            rows = self.query("SELECT name FROM sqlite_schema WHERE type = 'table'")
        else:
            rows = self.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return {r[0] for r in rows}

    def rows(self, table: str = "orders", columns: str = "*") -> list[tuple[Any, ...]]:
        return self.query(f"SELECT {columns} FROM {table} ORDER BY id")  # noqa: S608 (test text)

    def digest(self, table: str = "orders", columns: str = "*") -> str:
        """A checksum of every row (in key order), values as text."""
        text = repr([tuple(str(v) for v in r) for r in self.rows(table, columns)])
        return hashlib.sha256(text.encode()).hexdigest()

    def history(self) -> list[tuple[str, str]]:
        with self.migrator() as m:
            return [(h.version, h.outcome) for h in m.get_history()]

    def leftovers(self) -> set[str]:
        """Helper tables the migrator should not leave behind."""
        return {t for t in self.tables() if t.startswith("_themis_")}


def raises_with(fn: Callable[[], object], exc: type[BaseException]) -> BaseException:
    try:
        fn()
    except exc as caught:
        return caught
    raise AssertionError(f"{exc.__name__} not raised")
