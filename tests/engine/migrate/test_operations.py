"""Every operation and its inverse, on SQLite and on PostgreSQL: the schema and the rows
after apply and after rollback; idempotence, checksum refusal, history and version."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.migrate.helpers import Db, mig
from updates.engine.errors import MigrationTampered
from updates.engine.migrate import Outcome, Phase

ADD_STATUS: dict[str, Any] = {"op": "add_column", "table": "orders", "column": "status",
                              "type": "TEXT", "nullable": True, "default": "new"}  # fmt: skip
RENAME_QTY: dict[str, Any] = {
    "op": "rename_column",
    "table": "orders",
    "from": "qty",
    "to": "quantity",
}


def test_add_column_changes_no_row_and_rolls_back(db: Db) -> None:
    db.seed_orders()
    before, schema = db.digest(), db.schema()
    with db.migrator() as m:
        result = m.apply(mig("0001", [ADD_STATUS]))
        assert result.outcome == Outcome.APPLIED and result.steps == ("add_column orders.status",)
        assert db.schema().names == [*schema.names, "status"]
        assert db.query("SELECT DISTINCT status FROM orders") == [
            ("new",)
        ]  # the default, on every row
        assert db.digest(columns="id, qty, amount, legacy, note") == before
        assert m.get_version() == "0001"
        undone = m.rollback("0001")
    assert undone.outcome == Outcome.ROLLED_BACK
    assert db.schema() == schema
    assert db.digest() == before


def test_add_column_not_null_with_default(db: Db) -> None:
    db.seed_orders(5)
    op = {"op": "add_column", "table": "orders", "column": "priority", "type": "INTEGER",
          "nullable": False, "default": 3}  # fmt: skip
    with db.migrator() as m:
        m.apply(mig("0001", [op]))
        assert db.query("SELECT DISTINCT priority FROM orders") == [(3,)]
        assert next(c for c in db.schema().columns if c[0] == "priority")[2] is True
        db.run("INSERT INTO orders (id) VALUES (100)")
        assert db.query("SELECT priority FROM orders WHERE id = 100") == [(3,)]
        m.rollback("0001")
    assert "priority" not in db.schema().names


def test_apply_twice_is_a_noop_with_one_history_row(db: Db) -> None:
    db.seed_orders(10)
    migration = mig("0001", [ADD_STATUS, RENAME_QTY])
    with db.migrator() as m:
        first = m.apply(migration)
        schema, rows = db.schema(), db.digest()
        second = m.apply(migration)
        assert (first.outcome, second.outcome) == (Outcome.APPLIED, Outcome.ALREADY_APPLIED)
        assert second.steps == ()
        assert [(h.version, h.outcome) for h in m.get_history()] == [("0001", "applied")]
    with db.migrator() as again:  # and from a fresh process's point of view
        assert again.apply(migration).outcome == Outcome.ALREADY_APPLIED
    assert (db.schema(), db.digest()) == (schema, rows)
    assert db.history() == [("0001", "applied")]


def test_same_version_with_another_checksum_is_refused_and_changes_nothing(db: Db) -> None:
    db.seed_orders(10)
    with db.migrator() as m:
        m.apply(mig("0001", [ADD_STATUS]))
        schema, rows = db.schema(), db.digest()
        tampered = mig("0001", [ADD_STATUS, RENAME_QTY])
        with pytest.raises(MigrationTampered) as raised:
            m.apply(tampered)
        assert raised.value.exit_code == 28 and "0001" in str(raised.value)
        with pytest.raises(MigrationTampered):
            m.apply_all([tampered, mig("0002", [RENAME_QTY])])
    assert (db.schema(), db.digest()) == (schema, rows)
    assert db.history() == [("0001", "applied")]


def test_rename_column_keeps_values_and_renames_back(db: Db) -> None:
    db.seed_orders()
    before = db.rows(columns="id, qty")
    with db.migrator() as m:
        m.apply(mig("0001", [RENAME_QTY]))
        assert "quantity" in db.schema().names and "qty" not in db.schema().names
        assert db.rows(columns="id, quantity") == before
        m.rollback("0001")
    assert db.rows(columns="id, qty") == before
    assert "quantity" not in db.schema().names


@pytest.mark.parametrize("online", [False, True], ids=["plain", "online"])
def test_add_index_and_its_inverse(db: Db, online: bool) -> None:
    db.seed_orders()
    db.run("CREATE INDEX orders_note ON orders (note)")  # an index the copy must carry over
    before = db.digest()
    op = {"op": "add_index", "table": "orders", "name": "orders_qty_amount",
          "columns": ["qty", "amount"], "unique": False, "online": online}  # fmt: skip
    with db.migrator() as m:
        m.apply(mig("0001", [op]))
        assert db.schema().indexes == (
            ("orders_note", ("note",), False),
            ("orders_qty_amount", ("qty", "amount"), False),
        )
        assert db.digest() == before
        m.rollback("0001")
    assert db.schema().indexes == (("orders_note", ("note",), False),)
    assert db.digest() == before
    assert db.leftovers() == set()
    if db.sqlite:
        assert db.query("PRAGMA integrity_check") == [("ok",)]


def test_a_unique_index_on_duplicates_fails_and_leaves_nothing(db: Db) -> None:
    db.seed_orders(30)
    before, schema = db.digest(), db.schema()
    op = {"op": "add_index", "table": "orders", "name": "orders_qty", "columns": ["qty"],
          "unique": True, "online": True}  # fmt: skip
    with db.migrator() as m, pytest.raises(Exception, match="0001") as raised:
        m.apply(mig("0001", [ADD_STATUS, op]))
    assert raised.typename == "MigrationFailed" and "operations[1]" in str(raised.value)
    assert (db.schema(), db.digest()) == (schema, before)
    assert db.leftovers() == set()
    assert db.history() == [("0001", "failed")]


@pytest.mark.parametrize("online", [False, True], ids=["plain", "online"])
def test_change_column_type_converts_values_and_back(db: Db, online: bool) -> None:
    db.seed_orders()
    db.run("CREATE INDEX orders_amount ON orders (amount)")
    before = db.digest()
    op = {"op": "change_column_type", "table": "orders", "column": "amount", "type": "INTEGER",
          "online": online}  # fmt: skip
    with db.migrator(chunk_rows=37) as m:
        m.apply(mig("0001", [op]))
        assert db.schema().type_of("amount") == "INTEGER"
        assert db.rows(columns="id, amount") == [(i, i * 3) for i in range(1, 201)]
        assert ("orders_amount", ("amount",), False) in db.schema().indexes
        # The new type is real: arithmetic, not text.
        assert db.query("SELECT amount + 1 FROM orders WHERE id = 2") == [(7,)]
        m.rollback("0001")
    assert db.schema().type_of("amount") == "TEXT"
    assert db.digest() == before
    assert db.leftovers() == set()


def test_a_type_change_that_would_lose_values_is_refused(db: Db) -> None:
    db.seed_orders(20)
    db.run("UPDATE orders SET amount = '12.5' WHERE id = 7")
    before, schema = db.digest(), db.schema()
    op = {"op": "change_column_type", "table": "orders", "column": "amount", "type": "INTEGER",
          "online": True}  # fmt: skip
    with db.migrator() as m, pytest.raises(Exception, match=r"0001.*amount") as raised:
        m.apply(mig("0001", [op]))
    assert raised.typename == "MigrationFailed"
    assert (db.schema(), db.digest()) == (schema, before)
    assert db.leftovers() == set()


def test_drop_column_hides_it_and_rollback_brings_it_back(db: Db) -> None:
    db.seed_orders()
    before, schema = db.digest(), db.schema()
    op = {"op": "drop_column", "table": "orders", "column": "legacy", "grace_seconds": 3600}
    with db.migrator() as m:
        m.apply(mig("0001", [op], phase="contract"))
        names = db.schema().names
        assert "legacy" not in names and "_themis_dropped_legacy_0001" in names
        # The data is still there, under the hidden name.
        assert db.rows(columns="id, _themis_dropped_legacy_0001") == db.query(
            "SELECT id, 'legacy-' || id FROM orders ORDER BY id"
        )
        assert m.finish_grace() == []  # the grace period has not ended
        m.rollback("0001")
    assert (db.schema(), db.digest()) == (schema, before)


def test_a_migration_of_several_operations_rolls_back_in_reverse(db: Db) -> None:
    db.seed_orders()
    before, schema = db.digest(), db.schema()
    ops: list[dict[str, Any]] = [
        ADD_STATUS,
        RENAME_QTY,
        {"op": "add_index", "table": "orders", "name": "orders_status_qty",
         "columns": ["status", "quantity"], "online": True},
        {"op": "change_column_type", "table": "orders", "column": "amount", "type": "BIGINT",
         "online": True},
        {"op": "drop_column", "table": "orders", "column": "note", "grace_seconds": 60},
    ]  # fmt: skip
    with db.migrator(chunk_rows=50) as m:
        result = m.apply(mig("0007", ops))
        assert len(result.steps) == 5
        assert db.schema().names == ["id", "quantity", "amount", "legacy",
                                     "_themis_dropped_note_0007", "status"]  # fmt: skip
        undone = m.rollback("0007")
        assert undone.steps[0] == "undo drop_column orders.note"
    assert (db.schema(), db.digest()) == (schema, before)
    assert db.leftovers() == set()


def test_rollback_to_rolls_back_newest_first_and_history_keeps_every_attempt(db: Db) -> None:
    db.seed_orders(20)
    schema, before = db.schema(), db.digest()
    migrations = [
        mig("0001", [ADD_STATUS]),
        mig("0002", [RENAME_QTY]),
        mig("0010", [{"op": "add_column", "table": "orders", "column": "x", "type": "REAL"}],
            phase="contract"),
    ]  # fmt: skip
    with db.migrator() as m:
        assert [r.version for r in m.apply_all(migrations, phase=Phase.EXPAND)] == ["0001", "0002"]
        assert m.get_version() == "0002"
        assert [r.outcome for r in m.apply_all(migrations)] == [
            Outcome.ALREADY_APPLIED, Outcome.ALREADY_APPLIED, Outcome.APPLIED,
        ]  # fmt: skip
        assert m.get_version() == "0010"
        with pytest.raises(Exception, match="rollback_to"):
            m.rollback("0001")  # not the newest
        back = m.rollback_to("0001")
        assert [(r.version, r.outcome) for r in back] == [("0010", "rolled_back"),
                                                          ("0002", "rolled_back")]  # fmt: skip
        assert m.get_version() == "0001"
        assert m.rollback("0002").outcome == Outcome.NOTHING_TO_DO
        assert [r.version for r in m.rollback_to(None)] == ["0001"]
        assert m.get_version() is None
        history = m.get_history()
    assert [(h.version, h.outcome) for h in history] == [
        ("0001", "applied"), ("0002", "applied"), ("0010", "applied"), ("0010", "rolled_back"),
        ("0002", "rolled_back"), ("0001", "rolled_back"),
    ]  # fmt: skip
    assert all(h.finished_at >= h.started_at and h.duration_ms >= 0 for h in history)
    assert history[0].to_dict()["checksum"] == migrations[0].checksum
    assert (db.schema(), db.digest()) == (schema, before)


def test_a_version_rolled_back_can_be_applied_again(db: Db) -> None:
    db.seed_orders(5)
    with db.migrator() as m:
        m.apply(mig("0001", [ADD_STATUS]))
        m.rollback("0001")
        assert m.apply(mig("0001", [ADD_STATUS])).outcome == Outcome.APPLIED
        assert m.get_version() == "0001"
    assert "status" in db.schema().names


def test_rollbacks_go_by_the_order_of_application_not_the_numbers(db: Db) -> None:
    """A release's expand migration (0004) runs before the cluster moves, its contract one
    (0003, a lower number) after: undoing goes in reverse order of application."""
    db.seed_orders(10)
    schema = db.schema()
    expand = mig("0004", [ADD_STATUS])
    contract = mig("0003", [RENAME_QTY], phase="contract")
    failing = mig("0006", [{**ADD_STATUS, "table": "nowhere"}])
    with db.migrator() as m:
        m.apply_all([expand, contract], phase=Phase.EXPAND)
        m.apply_all([expand, contract], phase=Phase.CONTRACT)
        assert m.get_version() == "0004"
        with pytest.raises(Exception, match="rollback 0004: 0003 was applied after it"):
            m.rollback("0004")
        # A failing apply_all rolls back what it applied even below older versions.
        with pytest.raises(Exception, match="migration 0006"):
            m.apply_all([mig("0002", [{**ADD_STATUS, "column": "x"}]), failing])
        assert "x" not in db.schema().names
        back = m.rollback_to(None)
    assert [r.version for r in back] == ["0003", "0004"]
    assert db.schema() == schema
