"""Schema migrations inside an apply (docs/bundle-format.md): expand migrations run after
the switch and before the reload; a failure anywhere rolls schema, data and files back;
undoing the update (automatic rollback, recover after a kill, a release rollback) returns
the schema to what the update found. Real signed bundles, a real SQLite node database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.engine.apply_fixtures import (
    NEW_FILES,
    OLD_TREE,
    Node,
    bundles_fixture,
    node_fixture,
    snapshot,
    write_tree,
)
from updates.engine.apply import apply_bundle, recover, rollback
from updates.engine.errors import (
    HealthCheckFailed,
    ManifestInvalid,
    MigrationFailed,
    MigrationTampered,
)
from updates.engine.migrate import SchemaMigrator
from updates.engine.protocols import SchemaMigrator as SchemaMigratorSeam
from updates.engine.restore import load_point
from updates.engine.schema import DATABASE_URL_ENV, schema_status
from updates.engine.state import load_state

bundles = bundles_fixture
node = node_fixture

ADD_STATUS = {
    "version": "0001",
    "phase": "expand",
    "description": "orders get a status",
    "operations": [
        {
            "op": "add_column",
            "table": "orders",
            "column": "status",
            "type": "TEXT",
            "nullable": True,
            "default": "new",
        }
    ],
}
RENAME_QTY = {
    "version": "0002",
    "phase": "expand",
    "description": "qty is quantity",
    "operations": [{"op": "rename_column", "table": "orders", "from": "qty", "to": "quantity"}],
}
BROKEN = {
    "version": "0003",
    "phase": "expand",
    "description": "names a table that does not exist",
    "operations": [
        {"op": "add_column", "table": "nowhere", "column": "x", "type": "TEXT", "nullable": True}
    ],
}


@pytest.fixture(autouse=True)
def _no_database_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)


def _database(node: Node) -> Path:
    return node.state / "data" / "themis.db"


def _seed(node: Node) -> None:
    """The node's data as the old release's service left it."""
    path = _database(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER, amount INTEGER)")
        conn.executemany(
            "INSERT INTO orders (qty, amount) VALUES (?, ?)", [(i % 7, i * 10) for i in range(50)]
        )
    conn.close()


def _columns(node: Node) -> list[str]:
    with sqlite3.connect(_database(node)) as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(orders)")]
    conn.close()
    return names


def _rows(node: Node) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_database(node)) as conn:
        rows = list(conn.execute("SELECT id, amount FROM orders ORDER BY id"))
    conn.close()
    return rows


def _bundle(node: Node, version: str, *migrations: dict[str, Any], **kwargs: Any) -> Path:
    files: dict[str, bytes | tuple[bytes, int]] = dict(NEW_FILES)
    for migration in migrations:
        files[f"migrations/{migration['version']}.json"] = json.dumps(migration).encode()
    refs = [{"version": m["version"], "phase": m["phase"]} for m in migrations]
    return node.maker.make(version, files, manifest={"migrations": refs}, **kwargs)


def test_an_apply_runs_the_expand_migrations_and_records_where_the_schema_was(
    node: Node,
) -> None:
    _seed(node)
    rows = _rows(node)
    result = apply_bundle(_bundle(node, "2.0.0", ADD_STATUS, RENAME_QTY), **node.kwargs())
    assert _columns(node) == ["id", "quantity", "amount", "status"]
    assert _rows(node) == rows
    assert result.schema_version == "0002"
    assert [(m["version"], m["outcome"]) for m in result.migrations] == [
        ("0001", "applied"),
        ("0002", "applied"),
    ]
    assert "migrate" in result.durations_ms
    point = load_point(node.state, result.restore_point)
    assert point.schema is not None and point.schema.version is None
    history = schema_status(node.state)
    assert history["schema_version"] == "0002"
    # The migration files are installed with the release: its rollback needs no bundle.
    assert (node.target / "migrations" / "0001.json").is_file()


def test_a_failing_migration_rolls_back_schema_data_and_files_with_exit_27(node: Node) -> None:
    _seed(node)
    before, rows = snapshot(node.target), _rows(node)
    bundle = _bundle(node, "2.0.0", ADD_STATUS, RENAME_QTY, BROKEN)
    with pytest.raises(MigrationFailed) as raised:
        apply_bundle(bundle, **node.kwargs())
    assert raised.value.exit_code == 27
    assert "0003" in str(raised.value) and "rolled back to None" in str(raised.value)
    assert snapshot(node.target) == before
    assert _columns(node) == ["id", "qty", "amount"]  # 0001 and 0002 undone
    assert _rows(node) == rows
    assert load_state(node.state).installed_version is None
    assert schema_status(node.state)["schema_version"] is None


def test_a_failed_health_check_after_the_migrations_rolls_the_schema_back(node: Node) -> None:
    _seed(node)
    before = snapshot(node.target)
    with pytest.raises(HealthCheckFailed):
        apply_bundle(_bundle(node, "2.0.0", ADD_STATUS), **node.kwargs(health_cmd="exit 3"))
    assert snapshot(node.target) == before
    assert _columns(node) == ["id", "qty", "amount"]


def test_the_same_version_with_another_checksum_is_refused_with_exit_28(node: Node) -> None:
    _seed(node)
    apply_bundle(_bundle(node, "2.0.0", ADD_STATUS), **node.kwargs())
    installed = snapshot(node.target)
    tampered = {**ADD_STATUS, "description": "not what ran here"}
    with pytest.raises(MigrationTampered) as raised:
        apply_bundle(_bundle(node, "2.1.0", tampered, RENAME_QTY), **node.kwargs())
    assert raised.value.exit_code == 28
    assert snapshot(node.target) == installed
    assert _columns(node) == ["id", "qty", "amount", "status"]  # 0002 never ran
    assert load_state(node.state).installed_version == "2.0.0"


def test_a_release_rollback_returns_the_schema_to_what_the_update_found(node: Node) -> None:
    _seed(node)
    rows = _rows(node)
    first = apply_bundle(_bundle(node, "2.0.0", ADD_STATUS), **node.kwargs())
    assert first.schema_version == "0001"
    second = apply_bundle(_bundle(node, "2.1.0", ADD_STATUS, RENAME_QTY), **node.kwargs())
    assert [m["outcome"] for m in second.migrations] == ["already_applied", "applied"]
    rollback(target=node.target, state_dir=node.state)
    assert _columns(node) == ["id", "qty", "amount", "status"]  # back to 2.0.0's schema
    assert schema_status(node.state)["schema_version"] == "0001"
    rollback(target=node.target, state_dir=node.state)
    assert _columns(node) == ["id", "qty", "amount"]
    assert _rows(node) == rows
    reference = node.target.parent / "reference"
    write_tree(reference, OLD_TREE)
    assert snapshot(node.target) == snapshot(reference)


def test_an_apply_killed_after_its_migrations_is_undone_by_recover(node: Node) -> None:
    _seed(node)
    before, rows = snapshot(node.target), _rows(node)
    bundle = _bundle(node, "2.0.0", ADD_STATUS, RENAME_QTY)
    # The health command kills the apply: after the switch and the migrations, before
    # the commit point.
    proc = subprocess.run(
        node.cli(
            "apply",
            bundle,
            "--target",
            node.target,
            "--state-dir",
            node.state,
            "--trust-anchor",
            node.trust_anchor,
            "--health-cmd",
            "kill -9 $PPID",
        ),  # fmt: skip
        capture_output=True,
        env={**os.environ},
        timeout=60,
    )
    assert proc.returncode == -9
    assert _columns(node) == ["id", "quantity", "amount", "status"]  # killed migrated
    result = recover(target=node.target, state_dir=node.state)
    assert result["action"] == "undone"
    assert _columns(node) == ["id", "qty", "amount"]
    assert _rows(node) == rows
    assert snapshot(node.target) == before
    # And the same bundle then installs whole.
    again = apply_bundle(bundle, **node.kwargs())
    assert again.schema_version == "0002"


def test_a_bundle_whose_migration_file_says_another_phase_is_refused_before_any_change(
    node: Node,
) -> None:
    _seed(node)
    before = snapshot(node.target)
    files: dict[str, bytes | tuple[bytes, int]] = dict(NEW_FILES)
    files["migrations/0001.json"] = json.dumps(ADD_STATUS).encode()
    bundle = node.maker.make(
        "2.0.0", files, manifest={"migrations": [{"version": "0001", "phase": "contract"}]}
    )
    with pytest.raises(ManifestInvalid, match="migrations/0001.json: phase"):
        apply_bundle(bundle, **node.kwargs())
    assert snapshot(node.target) == before
    assert _columns(node) == ["id", "qty", "amount"]
    assert sorted((node.state / "points").glob("*")) == []  # no restore point was made


def test_a_bundle_without_migrations_never_opens_a_node_database(node: Node) -> None:
    result = apply_bundle(node.maker.make("2.0.0", NEW_FILES), **node.kwargs())
    assert result.schema_version is None and result.migrations == []
    assert not _database(node).exists()
    assert load_point(node.state, result.restore_point).schema is None


def test_schema_status_creates_no_database_and_no_tables(node: Node) -> None:
    assert schema_status(node.state) == {"schema_version": None, "history": []}
    assert not _database(node).exists()
    _seed(node)  # a database no migration ever touched
    assert schema_status(node.state) == {"schema_version": None, "history": []}
    with sqlite3.connect(_database(node)) as conn:
        tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master"))
    conn.close()
    assert tables == ["orders"]


def test_the_migrator_is_the_designs_schema_migrator_seam(node: Node) -> None:
    # mypy checks the assignment against the protocol; the call checks it is the real one.
    with SchemaMigrator(f"sqlite:///{node.state / 'seam.db'}", state_dir=node.state) as real:
        seam: SchemaMigratorSeam = real
        assert seam.get_version() is None and seam.get_history() == []
