"""Online DDL: change a table that needs a copy without blocking its writers for long.

shadow table with the new schema → triggers on the original keep the shadow in sync
(dual write) → chunked backfill by key, `chunk_rows` per transaction, `throttle_seconds`
between chunks → verify (row counts, an order-independent checksum over both tables with
the converted values, and for a type change that every value converts there and back
unchanged) → swap by rename in one transaction, which also marks the operation done →
drop the old table in small steps.

Each step commits with its progress in `themis_online_ddl` (step, last key, the plan), so
after a crash `resume()` continues from the last key, or finishes dropping the old table
once the swap committed. Until the swap the original table is untouched, and after it the
old one is kept until the new one is in place: no instant loses the table or its rows.
The dialect specifics (DDL, triggers, the swap) live in shadow_sqlite.py / shadow_pg.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from .connection import Connection, Dialect, Param
from .sql import aux_name, qlist, quote
from .store import ONLINE


class OperationError(Exception):
    """An operation cannot be done as asked (the cause in a MigrationFailed)."""


class CopyKind(StrEnum):
    CHANGE_TYPE = "change_type"
    ADD_INDEX = "add_index"
    DROP_COLUMN = "drop_column"


class Step(StrEnum):
    SHADOW = "shadow_created"
    TRIGGERS = "triggers"
    BACKFILL = "backfill"
    VERIFIED = "verified"
    SWAPPED = "swapped"
    BUILDING = "building"  # PostgreSQL CREATE INDEX CONCURRENTLY (schema.py)


@dataclass
class ColumnMap:
    """A shadow column and where its value comes from (cast to `cast` if set)."""

    name: str
    source: str
    cast: str | None = None


@dataclass
class Rename:
    """An index or constraint of the original that the shadow carries under `temp`; at
    the swap the original's is parked under `parked`, the shadow's takes `final`.
    `final_sql` / `parked_sql`: SQLite's schema text for each (see shadow_sqlite)."""

    final: str
    temp: str
    parked: str
    kind: str = "index"  # or "constraint" (PostgreSQL)
    final_sql: str = ""
    parked_sql: str = ""


@dataclass
class Plan:
    """Everything the procedure needs, fixed when the shadow is made and stored as JSON,
    so a resumed run does exactly what the first one began."""

    kind: CopyKind
    table: str
    version: str
    op_index: int
    owner: str  # "migration" (an operation of the in-flight migration) or "grace"
    shadow: str
    old: str
    key: list[str]  # chunking key; ["rowid"] for a SQLite table without an alias
    copy_rowid: bool  # SQLite: carry rowid explicitly so it survives the copy
    columns: list[ColumnMap]
    create_sql: list[str]  # the shadow's DDL
    renames: list[Rename] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    function: str = ""  # PostgreSQL trigger function
    # type change: the column and its old type, for the round-trip check
    changed: str = ""
    old_type: str = ""
    sequences: list[dict[str, str]] = field(default_factory=list)  # PostgreSQL
    # What the shadow must look like (columns, then index shapes): checked right after it
    # is made, in the same transaction, so a table we cannot reproduce is never copied.
    expect: list[list[Any]] = field(default_factory=list)
    expect_indexes: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw: dict[str, Any] = json.loads(text)
        raw["kind"] = CopyKind(raw["kind"])
        raw["columns"] = [ColumnMap(**c) for c in raw["columns"]]
        raw["renames"] = [Rename(**r) for r in raw["renames"]]
        return cls(**raw)

    def source_expr(self, col: ColumnMap, prefix: str) -> str:
        expr = f"{prefix}.{quote(col.source)}"
        return f"CAST({expr} AS {col.cast})" if col.cast else expr

    def target_columns(self) -> list[str]:
        names = [c.name for c in self.columns]
        return ["rowid", *names] if self.copy_rowid else names

    def source_exprs(self, prefix: str) -> list[str]:
        exprs = [self.source_expr(c, prefix) for c in self.columns]
        return [f"{prefix}.rowid", *exprs] if self.copy_rowid else exprs


def names_for(table: str, version: str, op_index: int, owner: str) -> tuple[str, str]:
    """The shadow's and the old table's names, one pair per operation (an operation and
    its inverse never run at once; two operations of a migration may share a table)."""
    tail = (version, str(op_index) if owner == "migration" else f"g{op_index}")
    return aux_name("_themis_new", table, *tail), aux_name("_themis_old", table, *tail)


class ShadowDialect(Protocol):
    """What differs between SQLite and PostgreSQL (shadow_sqlite.py, shadow_pg.py)."""

    @property
    def conn(self) -> Connection: ...

    def check_shadow(self, plan: Plan) -> None: ...

    def locked(self, transaction: Callable[[], None]) -> None:
        """Run a transaction that locks the live table (PostgreSQL: bounded waits, tried
        again a few times)."""

    def create_triggers(self, plan: Plan) -> None: ...

    def drop_triggers(self, plan: Plan) -> None: ...

    def chunk_insert_sql(self, plan: Plan, where: str) -> str: ...

    def checksum_sql(self, exprs: list[str], table: str) -> str: ...

    def lossless_sql(self, plan: Plan) -> str: ...

    def snapshot(self) -> Any: ...

    def swap(self, plan: Plan, finish: Callable[[], None]) -> None: ...

    def drop_table(self, name: str, chunk_rows: int, throttle: float) -> None: ...


@dataclass
class Tuning:
    chunk_rows: int
    throttle_seconds: float
    fault: Callable[[str], None]


class OnlineCopy:
    """Runs (or resumes) one online copy described by a Plan."""

    def __init__(self, dialect: ShadowDialect, tuning: Tuning) -> None:
        self.d = dialect
        self.conn = dialect.conn
        self.t = tuning

    # --- the procedure -----------------------------------------------------------------

    def run(self, shadow: str, make_plan: Callable[[], Plan], on_swap: Callable[[], None]) -> Plan:
        """Make the shadow `shadow` (or pick up the one a crashed run left, without
        planning again), go through every step and swap; `on_swap` runs inside the swap's
        transaction (the operation is done exactly when the new table is in place)."""
        plan, step = self._start(shadow, make_plan)
        try:
            if step is Step.SHADOW:
                self.t.fault("online.shadow_created")
            step = self._sync(plan, step)
            if step is not Step.SWAPPED:
                self.d.swap(plan, lambda: self._swapped(plan, on_swap))
        except BaseException as exc:
            try:
                self.abort(plan)
            except Exception as cleanup:  # the first error is the one to report
                exc.add_note(f"removing the copy failed too ({cleanup}): resume() retries")
            raise
        self.t.fault("online.swapped")
        self.finish(plan)
        return plan

    def _start(self, shadow: str, make_plan: Callable[[], Plan]) -> tuple[Plan, Step]:
        row = self.conn.query(f"SELECT step, spec FROM {ONLINE} WHERE name = ?", (shadow,))
        if row and row[0][0] == Step.SWAPPED:
            # An earlier copy under these names swapped but did not drop its old table yet
            # (its operation is done): finish it, then start afresh.
            self.finish(Plan.from_json(row[0][1]))
            row = []
        if row:
            return Plan.from_json(row[0][1]), Step(row[0][0])
        plan = make_plan()
        with self.conn.transaction():
            for statement in plan.create_sql:
                self.conn.execute(statement)
            self.d.check_shadow(plan)
            self.conn.execute(
                f"INSERT INTO {ONLINE} (name, tbl, version, op_index, step, last_key, spec)"
                " VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (plan.shadow, plan.table, plan.version, plan.op_index, Step.SHADOW, plan.to_json()),
            )
        return plan, Step.SHADOW

    def _sync(self, plan: Plan, step: Step) -> Step:
        """Triggers, backfill, verify: up to the swap."""
        if step is Step.SHADOW:

            def triggers() -> None:
                with self.conn.transaction():
                    self.d.create_triggers(plan)
                    self._set_step(plan, Step.TRIGGERS)

            self.d.locked(triggers)
            self.t.fault("online.triggers")
            step = Step.TRIGGERS
        if step in (Step.TRIGGERS, Step.BACKFILL):
            with self.conn.bulk():
                self._backfill(plan)
            self.t.fault("online.backfilled")
            self._verify(plan)
            with self.conn.transaction():
                self._set_step(plan, Step.VERIFIED)
            self.t.fault("online.verified")
            step = Step.VERIFIED
        return step

    def _swapped(self, plan: Plan, on_swap: Callable[[], None]) -> None:
        self._set_step(plan, Step.SWAPPED)
        on_swap()

    def finish(self, plan: Plan) -> None:
        """After the swap: drop the old table, gently, then forget the copy."""
        with self.conn.bulk():
            self.d.drop_table(plan.old, self.t.chunk_rows, self.t.throttle_seconds)
        with self.conn.transaction():
            self.conn.execute(f"DELETE FROM {ONLINE} WHERE name = ?", (plan.shadow,))
        self.t.fault("online.old_dropped")

    def abort(self, plan: Plan) -> None:
        """Before the swap: drop triggers and shadow; the original was never touched."""
        step = self.conn.scalar(f"SELECT step FROM {ONLINE} WHERE name = ?", (plan.shadow,))
        if step == Step.SWAPPED:
            return  # done already; only the old table is left, for finish()

        def untrigger() -> None:
            with self.conn.transaction():
                self.d.drop_triggers(plan)

        self.d.locked(untrigger)
        self.d.drop_table(plan.shadow, self.t.chunk_rows, 0.0)
        with self.conn.transaction():
            self.conn.execute(f"DELETE FROM {ONLINE} WHERE name = ?", (plan.shadow,))

    # --- steps -------------------------------------------------------------------------

    def _set_step(self, plan: Plan, step: Step, last_key: str | None = None) -> None:
        if last_key is None:
            sql = f"UPDATE {ONLINE} SET step = ? WHERE name = ?"
            self.conn.execute(sql, (str(step), plan.shadow))
        else:
            sql = f"UPDATE {ONLINE} SET step = ?, last_key = ? WHERE name = ?"
            self.conn.execute(sql, (str(step), last_key, plan.shadow))

    def _backfill(self, plan: Plan) -> None:
        raw = self.conn.scalar(f"SELECT last_key FROM {ONLINE} WHERE name = ?", (plan.shadow,))
        last: list[Param] | None = json.loads(raw) if raw else None
        while True:
            high = self._chunk_end(plan, last)
            if high is None:
                return
            where, params = self._range(plan, last, high)
            with self.conn.transaction():
                self.conn.execute(self.d.chunk_insert_sql(plan, where), params)
                self._set_step(plan, Step.BACKFILL, json.dumps(high))
            self.t.fault("online.backfill_chunk")
            last = high
            if self.t.throttle_seconds > 0:
                time.sleep(self.t.throttle_seconds)

    def _key(self, plan: Plan, prefix: str = "") -> str:
        return ", ".join(k if k == "rowid" else f"{prefix}{quote(k)}" for k in plan.key)

    def _chunk_end(self, plan: Plan, last: list[Param] | None) -> list[Param] | None:
        """The key of the chunk's last row: `chunk_rows` rows after `last`."""
        key = self._key(plan)
        where, params = ("", []) if last is None else (f"WHERE ({key}) > ({_marks(last)})", last)
        aliases = [f"_k{i}" for i in range(len(plan.key))]
        inner = ", ".join(f"{k} AS {a}" for k, a in zip(key.split(", "), aliases, strict=True))
        rows = self.conn.query(
            f"SELECT {', '.join(aliases)} FROM (SELECT {inner} FROM {quote(plan.table)} {where}"
            f" ORDER BY {key} LIMIT ?) AS chunk ORDER BY {' DESC, '.join(aliases)} DESC LIMIT 1",
            [*params, self.t.chunk_rows],
        )
        return list(rows[0]) if rows else None

    def _range(
        self, plan: Plan, last: list[Param] | None, high: list[Param]
    ) -> tuple[str, list[Param]]:
        key = self._key(plan, "o.")
        upper = f"({key}) <= ({_marks(high)})"
        if last is None:
            return upper, list(high)
        return f"({key}) > ({_marks(last)}) AND {upper}", [*last, *high]

    def _verify(self, plan: Plan) -> None:
        """Same rows, same values (the original's converted as the copy converts them),
        checked on one snapshot of both tables."""
        source = self.d.checksum_sql(plan.source_exprs("o"), f"{quote(plan.table)} AS o")
        target_exprs = [c if c == "rowid" else f"s.{quote(c)}" for c in plan.target_columns()]
        target = self.d.checksum_sql(target_exprs, f"{quote(plan.shadow)} AS s")
        with self.d.snapshot():
            src = self.conn.query(source)[0]
            dst = self.conn.query(target)[0]
            lossy = self.conn.query(self.d.lossless_sql(plan)) if plan.changed else []
        if lossy:
            raise OperationError(
                f"{plan.table}.{plan.changed}: the value at key {list(lossy[0])} does not"
                " convert to the new type and back unchanged"
            )
        if src[0] != dst[0]:
            raise OperationError(f"verify: {src[0]} rows in {plan.table}, {dst[0]} in the copy")
        if str(src[1]) != str(dst[1]):
            raise OperationError(f"verify: {plan.table} and its copy differ (checksum)")


def _marks(values: list[Param]) -> str:
    return ", ".join("?" for _ in values)


def select_columns(plan: Plan) -> str:
    return qlist(plan.target_columns()).replace('"rowid"', "rowid")


def dialect_of(conn: Connection) -> Dialect:
    return conn.dialect
