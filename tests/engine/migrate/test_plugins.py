"""Migration plugins through real entry points: a `*.dist-info` with an `entry_points.txt`
in a directory on sys.path is an installed distribution to importlib.metadata, so
discover_plugins() finds the sample plugin the way it finds any installed one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.engine.migrate.helpers import Db, mig
from tests.engine.migrate.sample_plugin import SamplePlugin
from updates.engine.errors import MigrationFailed
from updates.engine.migrate import ENTRY_POINT_GROUP, discover_plugins

ADD_TOTAL: dict[str, Any] = {"op": "add_column", "table": "orders", "column": "total",
                             "type": "INTEGER"}  # fmt: skip
FILL_TOTAL: dict[str, Any] = {
    "op": "custom", "plugin": "sample",
    "params": {"table": "orders", "target": "total", "left": "qty", "right": "id"},
    "rollback": {"reset_to": -1},
}  # fmt: skip


def install(site: Path, monkeypatch: pytest.MonkeyPatch, *entries: str) -> None:
    """Install a distribution whose entry points are `entries` (name = module:attr)."""
    info = site / "themis_sample_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: themis-sample-plugins\nVersion: 1.0\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]", *entries, ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    monkeypatch.syspath_prepend(str(site))


def test_discover_plugins_finds_the_installed_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [p.name for p in discover_plugins()] == []
    install(tmp_path / "site", monkeypatch,
            "sample = tests.engine.migrate.sample_plugin:SamplePlugin")  # fmt: skip
    found = discover_plugins()
    assert [(p.name, p.version) for p in found] == [("sample", "1.2.0")]
    assert isinstance(found[0], SamplePlugin)


def test_the_sample_plugin_applies_and_rolls_back_end_to_end(
    db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path / "site", monkeypatch,
            "sample = tests.engine.migrate.sample_plugin:SamplePlugin")  # fmt: skip
    db.seed_orders(25)
    with db.migrator(plugins=None) as m:  # None: discover the entry points
        m.apply(mig("0003", [ADD_TOTAL, FILL_TOTAL]))
        assert db.rows(columns="id, total") == [(i, (i % 7) * i) for i in range(1, 26)]
        history = m.get_history()
        assert [(h.version, h.outcome) for h in history] == [("0003", "applied")]
        # The rollback runs the plugin's inverse with the file's rollback parameters,
        # from what the history stored (no bundle needed).
        result = m.rollback("0003")
    assert result.steps == ("undo custom sample", "undo add_column orders.total")
    assert "total" not in db.schema().names
    stored = db.query("SELECT undo FROM themis_schema_history WHERE outcome = 'applied'")
    assert '"plugin": "sample"' in stored[0][0] and '"plugin_version": "1.2.0"' in stored[0][0]


def test_the_plugin_rollback_gets_its_parameters(
    sqlite_db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path / "site", monkeypatch,
            "sample = tests.engine.migrate.sample_plugin:SamplePlugin")  # fmt: skip
    db = sqlite_db
    db.seed_orders(5)
    db.run("ALTER TABLE orders ADD COLUMN total INTEGER")
    with db.migrator(plugins=None) as m:
        m.apply(mig("0003", [FILL_TOTAL]))
        m.rollback("0003")
    assert db.query("SELECT DISTINCT total FROM orders") == [(-1,)]


def test_a_broken_entry_point_stops_the_migration_naming_it(
    db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path / "site", monkeypatch, "broken = tests.engine.migrate.nowhere:Plugin")
    db.seed_orders(3)
    schema = db.schema()
    with db.migrator(plugins=None) as m, pytest.raises(MigrationFailed) as raised:
        m.apply(mig("0003", [ADD_TOTAL, FILL_TOTAL]))
    assert "migration plugin broken (tests.engine.migrate.nowhere:Plugin)" in str(raised.value)
    assert db.schema() == schema


def test_an_entry_point_that_is_no_plugin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path / "site", monkeypatch, "odd = tests.engine.migrate.helpers:mig")
    with pytest.raises(MigrationFailed, match="odd .*lacks name, version, can_handle"):
        discover_plugins()
