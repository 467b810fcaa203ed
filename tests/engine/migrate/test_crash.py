"""The migrator killed at each step (in a process of its own, os._exit at the step: see
crash_runner.py), on SQLite and on PostgreSQL. Right after the kill the table holds every
row (the original, or its complete copy once the swap committed); then a fresh migrator's
resume() and a re-run of the same call finish the work, and nothing of the migrator's
helpers is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from tests.engine.migrate.helpers import T0, Clock, Db, mig, mig_doc
from tests.procs import ROOT, unmeasured
from updates.engine.migrate import Outcome

DOC = mig_doc(
    "0002",
    [
        {"op": "add_column", "table": "orders", "column": "status", "type": "TEXT",
         "default": "new"},
        {"op": "change_column_type", "table": "orders", "column": "amount", "type": "BIGINT",
         "online": True},
    ],
)  # fmt: skip
MIGRATION = mig("0002", DOC["operations"])
ROWS = 500  # five chunks of 100

ONLINE_STEPS = [
    ("online.shadow_created", 1),
    ("online.triggers", 1),
    ("online.backfill_chunk", 1),
    ("online.backfill_chunk", 4),
    ("online.backfilled", 1),
    ("online.verified", 1),
    ("online.swapped", 1),
    ("online.old_dropped", 1),
]
APPLY_STEPS = [("migration.started", 1), ("op.applied", 1), *ONLINE_STEPS,
               ("op.applied", 2), ("history.recorded", 1)]  # fmt: skip
ROLLBACK_STEPS = [("rollback.started", 1), *ONLINE_STEPS, ("op.undone", 1), ("op.undone", 2),
                  ("history.recorded", 1)]  # fmt: skip


def kill_at(db: Db, action: str, step: str, nth: int, **extra: Any) -> None:
    args = {"url": db.url, "state": str(db.state), "action": action, "step": step, "nth": nth,
            "now": T0.isoformat(), "migrations": [DOC], **extra}  # fmt: skip
    argv = [sys.executable, "-m", "tests.engine.migrate.crash_runner", json.dumps(args)]
    # Not measured by coverage: a killed process cannot save its data.
    proc = subprocess.run(
        argv, cwd=ROOT, env=unmeasured(dict(os.environ)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 137, f"not killed at {step} #{nth}: {proc.returncode} {proc.stderr}"


def values(db: Db) -> list[tuple[Any, ...]]:
    """Every row, the amount as a number whatever the column's type is at the moment."""
    rows = db.rows(columns="id, qty, amount, legacy, note")
    return [(i, q, int(a), lg, n) for i, q, a, lg, n in rows]


def clean(db: Db, restore_points: frozenset[str] = frozenset()) -> None:
    assert db.leftovers() == set(restore_points)
    assert db.query("SELECT count(*) FROM themis_online_ddl") == [(0,)]
    assert db.query("SELECT count(*) FROM themis_schema_inflight") == [(0,)]
    if db.sqlite:
        assert db.query("PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize(("step", "nth"), APPLY_STEPS)
def test_killed_while_applying(db: Db, step: str, nth: int) -> None:
    db.seed_orders(ROWS)
    original = values(db)
    kill_at(db, "apply_all", step, nth)
    assert values(db) == original  # never lost, not even for an instant

    with db.migrator() as m:
        m.resume()
        result = m.apply(MIGRATION)
        assert result.outcome in (Outcome.APPLIED, Outcome.ALREADY_APPLIED)
        assert m.get_version() == "0002"
        history = [(h.version, h.outcome) for h in m.get_history()]
    assert history == [("0002", "applied")]
    assert db.schema().type_of("amount") == "BIGINT" and "status" in db.schema().names
    assert values(db) == original
    clean(db)


@pytest.mark.parametrize(("step", "nth"), ROLLBACK_STEPS)
def test_killed_while_rolling_back(db: Db, step: str, nth: int) -> None:
    db.seed_orders(ROWS)
    schema, original = db.schema(), values(db)
    with db.migrator() as m:
        m.apply(MIGRATION)
    kill_at(db, "rollback_to", step, nth, version=None)
    assert values(db) == original

    with db.migrator() as m:
        m.resume()
        m.rollback_to(None)
        assert m.get_version() is None
        history = [(h.version, h.outcome) for h in m.get_history()]
    assert history == [("0002", "applied"), ("0002", "rolled_back")]
    assert db.schema() == schema
    assert values(db) == original
    clean(db)


# SQLite: a restore point (backup), then an online copy without the column. PostgreSQL:
# one transaction (side table and DROP COLUMN), so one step after it.
SQLITE_GRACE_STEPS = [("grace.restore_point", 1), *ONLINE_STEPS, ("grace.dropped", 1)]


@pytest.mark.parametrize(("step", "nth"), SQLITE_GRACE_STEPS)
def test_killed_while_dropping_a_column_after_its_grace(sqlite_db: Db, step: str, nth: int) -> None:
    killed_while_dropping(sqlite_db, step, nth)


def test_killed_after_dropping_a_column_on_postgres(postgres_db: Db) -> None:
    killed_while_dropping(postgres_db, "grace.dropped", 1)


def killed_while_dropping(db: Db, step: str, nth: int) -> None:
    db.seed_orders(ROWS)
    legacy = db.rows(columns="id, legacy")
    others = db.rows(columns="id, qty, amount, note")
    drop = mig("0009", [{"op": "drop_column", "table": "orders", "column": "legacy"}])
    with db.migrator(now=Clock()) as m:  # the runner's clock: T0, the grace is over
        m.apply(drop)
    kill_at(db, "finish_grace", step, nth, migrations=[])
    assert db.rows(columns="id, qty, amount, note") == others

    with db.migrator(now=Clock()) as m:
        m.resume()
        assert m.finish_grace() in ([], ["orders.legacy (0009)"])
        assert "_themis_dropped_legacy_0009" not in db.schema().names
        # PostgreSQL keeps the dropped column's values in a side table until a rollback.
        clean(db, frozenset() if db.sqlite else frozenset({"_themis_saved_0009_orders_legacy"}))
        m.rollback("0009")
    assert db.rows(columns="id, legacy") == legacy
    assert db.rows(columns="id, qty, amount, note") == others
    clean(db)


INDEX_DOC = mig_doc(
    "0003",
    [{"op": "add_index", "table": "orders", "name": "orders_qty", "columns": ["qty", "id"],
      "online": True}],
)  # fmt: skip


@pytest.mark.parametrize(("step", "nth"), ONLINE_STEPS)
def test_killed_while_building_an_index_online_on_sqlite(
    sqlite_db: Db, step: str, nth: int
) -> None:
    """SQLite builds the index on a copy (with the table's other indexes under temporary
    names) and swaps: a kill at any step keeps the table, and its indexes, whole."""
    db = sqlite_db
    db.seed_orders(ROWS)
    db.run(
        "CREATE INDEX orders_note ON orders (note)",
        "CREATE UNIQUE INDEX orders_leg ON orders (legacy)",
    )
    original, indexes = values(db), db.schema().indexes
    kill_at(db, "apply_all", step, nth, migrations=[INDEX_DOC])
    assert values(db) == original
    assert {i[0] for i in indexes} <= {i[0] for i in db.schema().indexes}

    with db.migrator() as m:
        m.resume()
        m.apply(mig("0003", INDEX_DOC["operations"]))
    assert db.schema().indexes == (*indexes, ("orders_qty", ("qty", "id"), False))
    assert values(db) == original
    clean(db)


def test_an_invalid_index_left_by_a_dead_concurrent_build_is_rebuilt(postgres_db: Db) -> None:
    """PostgreSQL's CREATE INDEX CONCURRENTLY that dies leaves an INVALID index; the build
    was recorded first, so resume() drops it and builds it again."""
    db = postgres_db
    db.seed_orders(200)
    kill_at(db, "apply_all", "index.recorded", 1, migrations=[INDEX_DOC])
    # The build "dies midway": a real INVALID index of that name, as a failed concurrent
    # build leaves one (here: a unique build over duplicates).
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.run("CREATE UNIQUE INDEX CONCURRENTLY orders_qty ON orders (qty)")
    assert db.query(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_qty'::regclass"
    ) == [(False,)]

    with db.migrator() as m:
        assert m.resume() == ["0003: finished the interrupted apply"]
        assert m.get_version() == "0003"
    assert db.query(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'orders_qty'::regclass"
    ) == [(True,)]
    assert ("orders_qty", ("qty", "id"), False) in db.schema().indexes
    clean(db)
