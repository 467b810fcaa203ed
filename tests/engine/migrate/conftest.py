"""Fixtures for the schema migrator's tests: every test that takes `db` runs twice, on a
SQLite file of its own and on a database of its own in a real PostgreSQL server that the
session starts (tests/postgres.py) and stops at its end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres
from tests.engine.migrate.helpers import Db


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PostgresServer]:
    try:
        server = postgres.start_server()
    except postgres.PostgresMissing as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    if request.param == "sqlite":
        return Db(f"sqlite:///{tmp_path}/node/themis.db", tmp_path / "state")
    server: postgres.PostgresServer = request.getfixturevalue("pg_server")
    return Db(server.create_database(), tmp_path / "state")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Db:
    return Db(f"sqlite:///{tmp_path}/node/themis.db", tmp_path / "state")


@pytest.fixture
def postgres_db(pg_server: postgres.PostgresServer, tmp_path: Path) -> Db:
    return Db(pg_server.create_database(), tmp_path / "state")
