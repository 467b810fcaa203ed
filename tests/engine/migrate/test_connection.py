"""The database URL, the placeholder translation, and one migrator at a time per database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.engine.migrate.helpers import Db, mig
from updates.engine.errors import AlreadyInProgress, UsageError
from updates.engine.migrate import SchemaMigrator, database_url_for
from updates.engine.migrate.connection import DATABASE_URL_ENV, connect, to_pyformat


def test_the_node_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    assert database_url_for(tmp_path / "data") == f"sqlite:///{tmp_path}/data/themis.db"
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://node@db:5432/themis")
    assert database_url_for(tmp_path / "data") == "postgresql://node@db:5432/themis"


def test_an_unknown_url_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="database URL: expected sqlite:///PATH"):
        SchemaMigrator("mysql://x/y", state_dir=tmp_path)


def test_placeholders_become_psycopgs_outside_quotes_only() -> None:
    sql = "SELECT '?', \"a?b\", x FROM t WHERE a = ? AND b LIKE '50%' AND c = ?"
    assert to_pyformat(sql) == (
        "SELECT '?', \"a?b\", x FROM t WHERE a = %s AND b LIKE '50%%' AND c = %s"
    )


def test_parameters_reach_postgres_as_data(postgres_db: Db) -> None:
    conn = connect(postgres_db.url)
    try:
        row = conn.query("SELECT ?::text, '?', '100%'", ("it's ?; %s",))
    finally:
        conn.close()
    assert row == [("it's ?; %s", "?", "100%")]


def test_a_second_migrator_on_the_same_database_is_refused(db: Db) -> None:
    """One migration at a time per database (a PostgreSQL advisory lock, a lock file
    beside the SQLite file); the one refused changes nothing."""
    db.seed_orders(300)
    refused: list[AlreadyInProgress] = []
    other = db.migrator()
    change: dict[str, Any] = {"op": "change_column_type", "table": "orders", "column": "amount",
                              "type": "BIGINT", "online": True}  # fmt: skip

    def meanwhile(step: str) -> None:
        if step == "online.backfill_chunk" and not refused:
            with pytest.raises(AlreadyInProgress) as raised:
                other.apply(mig("0009", [{**change, "column": "qty", "type": "TEXT"}]))
            refused.append(raised.value)
            assert other.get_version() is None  # reading needs no lock

    with db.migrator(chunk_rows=100, fault=meanwhile) as m:
        m.apply(mig("0002", [change]))
    assert refused and refused[0].exit_code == 21
    assert other.apply(mig("0003", [{**change, "column": "qty", "type": "TEXT"}])).outcome == (
        "applied"
    )
    other.close()
    assert db.schema().type_of("qty") == "TEXT" and db.schema().type_of("amount") == "BIGINT"
