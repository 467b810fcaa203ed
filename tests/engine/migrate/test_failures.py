"""Fail closed: whatever fails, the operations this migration already did are undone, the
attempt is recorded as failed with its cause, MigrationFailed (exit 27) names the version,
the operation and the cause, and the database (schema and rows) is as the call found it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.migrate.helpers import Db, mig
from updates.engine.errors import MigrationFailed
from updates.engine.migrate import Custom
from updates.engine.migrate.connection import Connection

ADD_STATUS: dict[str, Any] = {"op": "add_column", "table": "orders", "column": "status",
                              "type": "TEXT", "default": "new"}  # fmt: skip
RENAME_QTY: dict[str, Any] = {"op": "rename_column", "table": "orders", "from": "qty",
                              "to": "quantity"}  # fmt: skip
TO_BIGINT: dict[str, Any] = {"op": "change_column_type", "table": "orders", "column": "amount",
                             "type": "BIGINT", "online": True}  # fmt: skip
CUSTOM: dict[str, Any] = {"op": "custom", "plugin": "stamp", "params": {"value": "x"},
                          "rollback": {}}  # fmt: skip


class StampPlugin:
    """Writes a value into orders.note (real SQL); its failures are switched on."""

    name = "stamp"
    version = "1.0"

    def __init__(self, *, apply_fails: bool = False, rollback_fails: bool = False) -> None:
        self.apply_fails, self.rollback_fails = apply_fails, rollback_fails

    def can_handle(self, op: Custom) -> bool:
        return op.plugin == self.name

    def apply(self, conn: Connection, op: Custom) -> None:
        conn.execute("UPDATE orders SET note = ?", (str(op.params["value"]),))
        if self.apply_fails:
            raise RuntimeError("stamp: the ink ran out")

    def rollback(self, conn: Connection, op: Custom) -> None:
        if self.rollback_fails:
            raise RuntimeError("stamp: cannot unstamp")
        conn.execute("UPDATE orders SET note = 'n'")


def _unchanged(db: Db, schema: object, digest: str) -> None:
    assert db.schema() == schema
    assert db.digest() == digest
    assert db.leftovers() == set()
    assert db.query("SELECT count(*) FROM themis_schema_inflight") == [(0,)]


def test_a_plugin_that_raises_undoes_the_migration(db: Db) -> None:
    db.seed_orders(50)
    db.run("UPDATE orders SET note = 'n'")
    schema, digest = db.schema(), db.digest()
    with db.migrator(plugins=[StampPlugin(apply_fails=True)]) as m:
        with pytest.raises(MigrationFailed) as raised:
            m.apply(mig("0003", [ADD_STATUS, RENAME_QTY, TO_BIGINT, CUSTOM]))
        history = m.get_history()
    assert raised.value.exit_code == 27
    assert str(raised.value) == (
        "migration 0003: operations[3] (custom stamp) failed: stamp: the ink ran out"
    )
    _unchanged(db, schema, digest)
    assert [(h.version, h.outcome, h.error) for h in history] == [
        ("0003", "failed", str(raised.value))
    ]


def test_no_plugin_for_a_custom_operation(db: Db) -> None:
    db.seed_orders(5)
    schema, digest = db.schema(), db.digest()
    with db.migrator(plugins=[]) as m, pytest.raises(MigrationFailed) as raised:
        m.apply(mig("0001", [ADD_STATUS, CUSTOM]))
    assert "operations[1] (custom stamp)" in str(raised.value)
    assert "no migration plugin handles plugin 'stamp'" in str(raised.value)
    _unchanged(db, schema, digest)


@pytest.mark.parametrize(
    ("op", "cause"),
    [
        ({**ADD_STATUS, "table": "nowhere"}, "table nowhere does not exist"),
        ({**ADD_STATUS, "column": "amount"}, "column orders.amount already exists"),
        ({**RENAME_QTY, "from": "nothing"}, "column orders.nothing does not exist"),
        ({**RENAME_QTY, "from": "amount", "to": "legacy"}, "column orders.legacy already exists"),
        ({"op": "add_index", "table": "orders", "name": "ix", "columns": ["nope"]},
         "column orders.nope does not exist"),
        ({"op": "drop_column", "table": "orders", "column": "id"}, "part of the primary key"),
        ({**TO_BIGINT, "column": "nope"}, "column orders.nope does not exist"),
    ],
)  # fmt: skip
def test_an_operation_that_cannot_be_done_undoes_the_earlier_ones(
    db: Db, op: dict[str, Any], cause: str
) -> None:
    db.seed_orders(20)
    schema, digest = db.schema(), db.digest()
    with db.migrator() as m, pytest.raises(MigrationFailed) as raised:
        m.apply(mig("0004", [ADD_STATUS, RENAME_QTY, op]))
    assert str(raised.value).startswith("migration 0004: operations[2] (")
    assert cause in str(raised.value)
    _unchanged(db, schema, digest)


def test_apply_all_failing_at_the_second_rolls_the_first_back(db: Db) -> None:
    db.seed_orders(40)
    schema, digest = db.schema(), db.digest()
    first = mig("0001", [ADD_STATUS, TO_BIGINT])
    second = mig("0002", [RENAME_QTY, {**ADD_STATUS, "table": "nowhere"}])
    third = mig("0003", [{**ADD_STATUS, "column": "never"}])
    with db.migrator() as m:
        with pytest.raises(MigrationFailed, match="migration 0002: operations\\[1\\]"):
            m.apply_all([third, second, first])
        assert m.get_version() is None
        history = [(h.version, h.outcome) for h in m.get_history()]
    assert history == [("0001", "applied"), ("0002", "failed"), ("0001", "rolled_back")]
    _unchanged(db, schema, digest)


def test_a_verify_mismatch_undoes_the_migration(db: Db) -> None:
    """The copy is damaged behind the migrator's back before verification: the checksum
    sees it, the copy is dropped and the original is left as it was."""
    db.seed_orders(120)
    schema, digest = db.schema(), db.digest()
    chunks = []

    def damage(step: str) -> None:
        if step == "online.backfill_chunk":
            chunks.append(step)
            if len(chunks) == 2:
                db.run("UPDATE _themis_new_orders_0005_1 SET qty = qty + 1 WHERE id = 3")

    with db.migrator(chunk_rows=50, fault=damage) as m, pytest.raises(MigrationFailed) as raised:
        m.apply(mig("0005", [ADD_STATUS, TO_BIGINT]))
    assert "operations[1] (change_column_type orders.amount)" in str(raised.value)
    assert "verify: orders and its copy differ (checksum)" in str(raised.value)
    _unchanged(db, schema, digest)


ONLINE_STEPS = [
    "online.shadow_created",
    "online.triggers",
    "online.backfill_chunk",
    "online.backfilled",
    "online.verified",
    "online.swapped",
    "online.old_dropped",
    "op.applied",
    "history.recorded",
]


@pytest.mark.parametrize("step", ONLINE_STEPS)
def test_an_exception_at_any_step_of_an_online_change_is_undone(db: Db, step: str) -> None:
    """An error (not a crash: see test_crash.py) at each step boundary of an online type
    change, the last operation of the migration."""
    db.seed_orders(90)
    schema, digest = db.schema(), db.digest()
    seen: list[str] = []

    def fail_at(name: str) -> None:
        # Once, at the change's own step (not again while the undo passes it).
        seen.append(name)
        if name == step and seen.count(name) == (2 if step == "op.applied" else 1):
            raise RuntimeError(f"injected at {name}")

    with db.migrator(chunk_rows=40, fault=fail_at) as m:
        if step == "history.recorded":
            # The migration is complete once its history row is written: nothing to undo.
            with pytest.raises(RuntimeError):
                m.apply(mig("0006", [ADD_STATUS, TO_BIGINT]))
            assert m.get_version() == "0006"
            assert db.schema().type_of("amount") == "BIGINT"
            return
        with pytest.raises(MigrationFailed, match=f"injected at {step}"):
            m.apply(mig("0006", [ADD_STATUS, TO_BIGINT]))
    _unchanged(db, schema, digest)
    assert db.history() == [("0006", "failed")]


def test_a_failed_rollback_leaves_the_version_applied(db: Db) -> None:
    db.seed_orders(30)
    plugin = StampPlugin()
    with db.migrator(plugins=[plugin]) as m:
        m.apply(mig("0001", [ADD_STATUS, CUSTOM, RENAME_QTY]))
        schema, digest = db.schema(), db.digest()
        plugin.rollback_fails = True
        with pytest.raises(MigrationFailed, match="rollback 0001: undo of operations\\[1\\]"):
            m.rollback("0001")
        assert m.get_version() == "0001"
        assert [(h.version, h.outcome) for h in m.get_history()] == [
            ("0001", "applied"),
            ("0001", "failed"),
        ]
    # The rename it had undone is done again: the schema is the applied one.
    _unchanged(db, schema, digest)


def test_an_undo_that_fails_is_finished_by_resume(db: Db) -> None:
    db.seed_orders(30)
    db.run("UPDATE orders SET note = 'n'")
    schema, digest = db.schema(), db.digest()
    plugin = StampPlugin(rollback_fails=True)
    broken = {**RENAME_QTY, "from": "nothing"}
    with db.migrator(plugins=[plugin]) as m:
        with pytest.raises(MigrationFailed, match="undoing it failed too .*resume"):
            m.apply(mig("0002", [ADD_STATUS, CUSTOM, broken]))
        assert db.query("SELECT direction, ops_done FROM themis_schema_inflight") == [("undo", 2)]
        plugin.rollback_fails = False
        assert m.resume() == ["0002: finished the interrupted undo"]
        assert m.get_version() is None
    _unchanged(db, schema, digest)
    assert db.history() == [("0002", "failed")]
