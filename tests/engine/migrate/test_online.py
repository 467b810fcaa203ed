"""Online DDL while the application writes: a writer thread inserts, updates and deletes
rows on its own connection during the whole copy; afterwards the table holds exactly the
writer's last word on every row (nothing lost, nothing stale), with the new type."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from psycopg.types.string import StrDumperUnknown

from tests.engine.migrate.helpers import Db, mig
from updates.engine.errors import MigrationFailed
from updates.engine.migrate.connection import PostgresConnection, connect

ROWS = 1500


class Writer(threading.Thread):
    """Writes continuously and keeps the rows as it last committed them (its model)."""

    def __init__(self, db: Db, model: dict[int, tuple[int, int]]) -> None:
        super().__init__(daemon=True)
        self.db, self.model = db, model
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None
        self.rng = random.Random(7)
        self.next_id = 100_000

    def run(self) -> None:
        conn = connect(self.db.url)
        if isinstance(conn, PostgresConnection):
            # Send text untyped, as a client writing literals would, so the same statement
            # works before the swap (text column) and after it (bigint).
            conn.raw.adapters.register_dumper(str, StrDumperUnknown)
            # A prepared statement keeps the parameter types of its first use (text).
            conn.raw.prepare_threshold = None
        try:
            while not self.stop.is_set():
                self._one(conn)
                self.writes += 1
                # Continuous but paced, as an application's writes are: a writer that never
                # pauses starves every other SQLite writer (busy handlers poll, no queue).
                time.sleep(0.001)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            conn.close()

    def _one(self, conn: Any) -> None:
        roll = self.rng.random()
        if roll < 0.4 or not self.model:
            self.next_id += 1
            qty, amount = self.rng.randrange(100), self.rng.randrange(10**6)
            conn.execute(
                "INSERT INTO orders (id, qty, amount) VALUES (?, ?, ?)",
                (self.next_id, qty, str(amount)),
            )
            self.model[self.next_id] = (qty, amount)
        elif roll < 0.9:
            key = self.rng.choice(list(self.model))
            qty, amount = self.model[key][0] + 1, self.rng.randrange(10**6)
            conn.execute(
                "UPDATE orders SET qty = ?, amount = ? WHERE id = ?", (qty, str(amount), key)
            )
            self.model[key] = (qty, amount)
        else:
            key = self.rng.choice(list(self.model))
            conn.execute("DELETE FROM orders WHERE id = ?", (key,))
            del self.model[key]


def _seed(db: Db) -> dict[int, tuple[int, int]]:
    db.seed_orders(ROWS)
    return {i: (i % 7, i * 3) for i in range(1, ROWS + 1)}


def _with_writer(db: Db, migrate: Callable[[], None]) -> tuple[Writer, int]:
    model = _seed(db)
    writer = Writer(db, model)
    writer.start()
    time.sleep(0.1)
    before = writer.writes
    try:
        migrate()
    finally:
        time.sleep(0.05)
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    return writer, writer.writes - before


def test_a_type_change_keeps_every_concurrent_write(db: Db) -> None:
    op = {"op": "change_column_type", "table": "orders", "column": "amount", "type": "BIGINT",
          "online": True}  # fmt: skip
    steps: list[str] = []

    def migrate() -> None:
        with db.migrator(chunk_rows=100, throttle_seconds=0.02, fault=steps.append) as m:
            m.apply(mig("0002", [op]))

    writer, during = _with_writer(db, migrate)
    assert steps.count("online.backfill_chunk") >= ROWS // 100
    assert during > 30, "the writer should have written all through the copy"
    rows = db.rows(columns="id, qty, amount")
    assert rows == sorted((k, q, a) for k, (q, a) in writer.model.items())
    assert db.schema().type_of("amount") == "BIGINT"
    assert db.leftovers() == set()


@pytest.mark.parametrize("unique", [False, True])
def test_an_online_index_is_built_while_writes_go_on(db: Db, unique: bool) -> None:
    op = {"op": "add_index", "table": "orders", "name": "orders_by_amount",
          "columns": ["amount", "id"], "unique": unique, "online": True}  # fmt: skip

    def migrate() -> None:
        with db.migrator(chunk_rows=100, throttle_seconds=0.02) as m:
            m.apply(mig("0002", [op]))

    writer, during = _with_writer(db, migrate)
    assert during > 10
    rows = db.rows(columns="id, qty, amount")
    assert rows == sorted((k, q, str(a)) for k, (q, a) in writer.model.items())
    assert ("orders_by_amount", ("amount", "id"), unique) in db.schema().indexes
    assert db.leftovers() == set()
    if db.sqlite:
        assert db.query("PRAGMA integrity_check") == [("ok",)]
        plan = db.query("EXPLAIN QUERY PLAN SELECT id FROM orders WHERE amount = '5'")
        assert "orders_by_amount" in str(plan)


def _blocker(db: Db, hold: float) -> threading.Thread:
    """An application transaction that keeps a row lock on orders for `hold` seconds."""
    ready = threading.Event()

    def run() -> None:
        conn = connect(db.url)
        with conn.transaction():
            conn.execute("UPDATE orders SET qty = qty WHERE id = 1")
            ready.set()
            time.sleep(hold)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    return thread


CHANGE = {"op": "change_column_type", "table": "orders", "column": "amount", "type": "BIGINT",
          "online": True}  # fmt: skip


def test_the_swap_waits_out_a_long_transaction(
    postgres_db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap's lock waits at most lock_timeout (no queue of writers behind it), then
    tries again."""
    monkeypatch.setattr("updates.engine.migrate.connection.LOCK_TIMEOUT_MS", 200)
    db = postgres_db
    db.seed_orders(300)
    before = db.rows(columns="id, qty")
    steps: list[str] = []

    def block_at_verify(step: str) -> None:
        steps.append(step)
        if step == "online.verified":
            blockers.append(_blocker(db, 0.8))

    blockers: list[threading.Thread] = []
    with db.migrator(fault=block_at_verify) as m:
        m.apply(mig("0002", [CHANGE]))
    blockers[0].join(10)
    assert db.schema().type_of("amount") == "BIGINT"
    assert db.rows(columns="id, qty") == before
    assert db.leftovers() == set()


def test_a_swap_that_never_gets_its_lock_fails_closed(
    postgres_db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("updates.engine.migrate.connection.LOCK_TIMEOUT_MS", 100)
    db = postgres_db
    db.seed_orders(300)
    schema, digest = db.schema(), db.digest()
    blockers: list[threading.Thread] = []

    def block_at_verify(step: str) -> None:
        if step == "online.verified":
            blockers.append(_blocker(db, 8.0))

    with db.migrator(fault=block_at_verify) as m, pytest.raises(MigrationFailed) as raised:
        m.apply(mig("0002", [CHANGE]))
    assert "lock timeout" in str(raised.value)
    blockers[0].join(15)
    assert (db.schema(), db.digest()) == (schema, digest)
    assert db.leftovers() == set()
