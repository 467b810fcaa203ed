"""drop_column with a grace period: hidden first (data kept), dropped by finish_grace once
the injected clock passes drop_after (restore point first), and a rollback after the drop
brings the column back with its data from the restore point."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Any

import pytest

from tests.engine.migrate.helpers import Clock, Db, Schema, mig
from updates.engine.errors import MigrationFailed

DROP_LEGACY: dict[str, Any] = {"op": "drop_column", "table": "orders", "column": "legacy",
                               "grace_seconds": 86400}  # fmt: skip
HIDDEN = "_themis_dropped_legacy_0004"


def _restore_point(db: Db) -> str:
    return str(db.state / "migrations" / "0004-0.sqlite3")


ALL = "id, qty, amount, legacy, note"


def _same_columns(db: Db, schema: Schema) -> None:
    """A column restored after its drop comes back last (ADD COLUMN appends): the same
    columns with the same definitions, the restored one at the end."""
    assert sorted(db.schema().columns) == sorted(schema.columns)
    assert db.schema().indexes == schema.indexes


def test_hidden_then_dropped_after_the_grace_then_restored_by_rollback(db: Db) -> None:
    db.seed_orders(150)
    schema, digest = db.schema(), db.digest(columns=ALL)
    legacy = db.rows(columns="id, legacy")
    others = db.digest(columns="id, qty, amount, note")
    clock = Clock()
    with db.migrator(now=clock, chunk_rows=40) as m:
        m.apply(mig("0004", [DROP_LEGACY], phase="contract"))
        assert HIDDEN in db.schema().names and "legacy" not in db.schema().names
        clock.moment += timedelta(seconds=86399)
        assert m.finish_grace() == []
        assert HIDDEN in db.schema().names

        clock.moment += timedelta(seconds=1)
        assert m.finish_grace() == ["orders.legacy (0004)"]
        assert db.schema().names == ["id", "qty", "amount", "note"]
        assert db.digest(columns="id, qty, amount, note") == others
        assert db.leftovers() <= {"_themis_saved_0004_orders_legacy"}
        if db.sqlite:  # the restore point: an online backup of the database
            with sqlite3.connect(_restore_point(db)) as saved:
                query = f"SELECT id, {HIDDEN} FROM orders ORDER BY id"  # noqa: S608
                kept = saved.execute(query).fetchall()
            saved.close()
        else:  # the column's values in a side table, by primary key
            kept = db.query(
                "SELECT id, _themis_value FROM _themis_saved_0004_orders_legacy ORDER BY id"
            )
        assert kept == legacy
        assert m.finish_grace() == []  # nothing twice
        db.run("INSERT INTO orders (id, qty) VALUES (1000, 1)")  # a row born after the drop

        m.rollback("0004")
    _same_columns(db, schema)
    assert db.schema().names[-1] == "legacy"
    assert db.rows(columns="id, legacy")[:-1] == legacy
    assert db.query("SELECT legacy FROM orders WHERE id = 1000") == [(None,)]
    db.run("DELETE FROM orders WHERE id = 1000")
    assert db.digest(columns=ALL) == digest
    assert db.leftovers() == set()
    assert not (db.state / "migrations" / "0004-0.sqlite3").exists()
    assert db.query("SELECT count(*) FROM themis_pending_drops") == [(0,)]


def test_a_not_null_column_with_a_default_comes_back_as_it_was(db: Db) -> None:
    db.run(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER,"
        " kind TEXT NOT NULL DEFAULT 'plain')"
    )
    db.run("INSERT INTO orders (id, qty, kind) VALUES (1, 1, 'gift'), (2, 2, 'plain')")
    schema = db.schema()
    clock = Clock()
    drop = {"op": "drop_column", "table": "orders", "column": "kind", "grace_seconds": 0}
    with db.migrator(now=clock) as m:
        m.apply(mig("0004", [drop], phase="contract"))
        db.run("INSERT INTO orders (id, qty) VALUES (3, 3)")  # the new code does not name it
        assert m.finish_grace() == ["orders.kind (0004)"]
        m.rollback("0004")
    _same_columns(db, schema)
    assert db.rows(columns="id, kind") == [(1, "gift"), (2, "plain"), (3, "plain")]


@pytest.mark.parametrize(
    ("setup", "cause"),
    [
        ("CREATE INDEX orders_legacy ON orders (legacy)", "is in index orders_legacy"),
        ("ALTER TABLE orders ADD COLUMN must TEXT NOT NULL DEFAULT 'x'", None),
    ],
)
def test_a_column_that_cannot_be_dropped_safely_is_refused(
    db: Db, setup: str, cause: str | None
) -> None:
    db.seed_orders(10)
    db.run(setup)
    schema, digest = db.schema(), db.digest()
    with db.migrator() as m:
        if cause is None:  # NOT NULL with a default is fine
            m.apply(mig("0004", [{**DROP_LEGACY, "column": "must"}]))
            return
        with pytest.raises(MigrationFailed, match=cause):
            m.apply(mig("0004", [DROP_LEGACY]))
    assert (db.schema(), db.digest()) == (schema, digest)
    assert db.query("SELECT count(*) FROM themis_pending_drops") == [(0,)]


def test_not_null_without_default_is_refused(sqlite_db: Db) -> None:
    db = sqlite_db
    db.run("CREATE TABLE orders (id INTEGER PRIMARY KEY, code TEXT NOT NULL)")
    db.run("INSERT INTO orders VALUES (1, 'a')")
    with db.migrator() as m, pytest.raises(MigrationFailed, match="NOT NULL without a default"):
        m.apply(mig("0004", [{**DROP_LEGACY, "column": "code"}]))
    assert db.schema().names == ["id", "code"]


def test_finish_grace_drops_only_what_is_due(db: Db) -> None:
    db.seed_orders(10)
    notes = db.rows(columns="id, note")
    clock = Clock()
    short = {**DROP_LEGACY, "column": "note", "grace_seconds": 10}
    with db.migrator(now=clock) as m:
        m.apply(mig("0004", [DROP_LEGACY]))
        m.apply(mig("0005", [short]))
        clock.moment += timedelta(seconds=10)
        assert m.finish_grace() == ["orders.note (0005)"]
        assert HIDDEN in db.schema().names
        # legacy's grace has not ended: its rollback renames it back; note's data comes
        # back from the restore point.
        m.rollback_to(None)
    assert db.schema().names == ["id", "qty", "amount", "legacy", "note"]
    assert db.rows(columns="id, note") == notes
    assert db.query("SELECT count(*) FROM orders WHERE legacy LIKE 'legacy-%'") == [(10,)]
