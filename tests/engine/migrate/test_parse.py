"""`migrations/<version>.json` is validated strictly: each refusal is a ManifestInvalid
(exit 12) naming the file and the field. Names that are not plain identifiers never reach
SQL, and defaults are data, not SQL, on both dialects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.engine.migrate.helpers import Db, mig, mig_doc
from updates.engine.errors import ManifestInvalid
from updates.engine.migrate import (
    AddColumn,
    ColumnType,
    Custom,
    Phase,
    RenameColumn,
    parse_migration,
)
from updates.engine.migrate.parse import MAX_OPERATIONS, operations_from_json, operations_to_json
from updates.engine.migrate.sql import literal, quote

NAME = "migrations/0002.json"
ADD: dict[str, Any] = {"op": "add_column", "table": "orders", "column": "status", "type": "TEXT"}


def _parse(doc: object, name: str = NAME) -> None:
    parse_migration(json.dumps(doc).encode(), name=name)


def _refused(doc: object, name: str = NAME) -> str:
    with pytest.raises(ManifestInvalid) as raised:
        _parse(doc, name)
    assert raised.value.exit_code == 12
    return str(raised.value)


def _op(**fields: Any) -> dict[str, Any]:
    return mig_doc("0002", [ADD, {**fields}])


def test_a_valid_file_parses_with_its_checksum() -> None:
    rename = {"op": "rename_column", "table": "orders", "from": "qty", "to": "quantity"}
    data = json.dumps(mig_doc("0002", [ADD, rename])).encode()
    m = parse_migration(data, name=NAME)
    assert m.version == "0002" and m.phase is Phase.EXPAND and m.number == 2
    assert m.operations == (
        AddColumn("orders", "status", ColumnType.TEXT),
        RenameColumn("orders", "qty", "quantity"),
    )
    import hashlib

    assert m.checksum == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (mig_doc("0003", [ADD]), "migrations/0002.json: version: '0003' does not match"),
        ({**mig_doc("0002", [ADD]), "extra": 1}, "migrations/0002.json: extra: unknown key"),
        ({"phase": "expand", "description": "", "operations": [ADD]}, ": version: required"),
        ({**mig_doc("0002", [ADD]), "version": 2}, "version: must be a string of 1 to 18"),
        ({**mig_doc("0002", [ADD]), "version": "0x2"}, "version: must be a string"),
        (mig_doc("0002", [ADD], phase="later"), "phase: must be one of expand, contract"),
        ({**mig_doc("0002", [ADD]), "description": 5}, "description: must be text"),
        (mig_doc("0002", []), "operations: at least one operation is required"),
        ({**mig_doc("0002", [ADD]), "operations": {}}, "operations: must be a list"),
        (mig_doc("0002", [ADD] * (MAX_OPERATIONS + 1)), "operations: at most 256"),
        ({**mig_doc("0002", [ADD]), "operations": [ADD, "x"]}, "operations[1]: must be an object"),
        (_op(table="orders", column="x", type="TEXT"), "operations[1].op: required"),
        (_op(op="drop_table", table="orders"), "operations[1].op: must be one of add_column"),
        (_op(op="add_column", table="orders", type="TEXT"), "operations[1].column: required"),
        (_op(op="add_column", table="orders", column="x", type="TEXT", sql="DROP TABLE x"),
         "operations[1].sql: unknown key"),
        (_op(op="add_column", table="orders", column="x", type="VARCHAR(20)"),
         "operations[1].type: must be one of INTEGER, BIGINT, TEXT"),
        (_op(op="add_column", table="orders", column="x", type="TEXT", nullable="no"),
         "operations[1].nullable: must be true or false"),
        (_op(op="add_column", table="orders", column="x", type="TEXT", nullable=False),
         "operations[1].default: required when nullable is false"),
        (_op(op="add_column", table="orders", column="x", type="INTEGER", default="1"),
         "operations[1].default: must be a JSON value of a INTEGER column"),
        (_op(op="add_column", table="orders", column="x", type="INTEGER", default=True),
         "operations[1].default: must be a JSON value of a INTEGER column"),
        (_op(op="add_column", table="orders", column="x", type="BOOLEAN", default=1),
         "operations[1].default: must be a JSON value of a BOOLEAN column"),
        (_op(op="add_column", table="orders", column="x", type="BLOB", default="ab"),
         "operations[1].default: a BLOB column takes no default"),
        (_op(op="add_column", table="orders", column="x", type="TEXT", default=["a"]),
         "operations[1].default: must be text"),
        (_op(op="add_column", table="orders", column="x", type="TEXT", default="'new'"),
         "operations[1].default: is a JSON value, not SQL: write 'new' without quotes"),
        (_op(op="rename_column", table="orders", **{"from": "a", "to": "a"}),
         "operations[1].to: must differ"),
        (_op(op="add_index", table="orders", name="ix", columns=[]),
         "operations[1].columns: must be a list of 1 to 32"),
        (_op(op="add_index", table="orders", name="ix", columns=["a", "a"]),
         "operations[1].columns: names a column twice"),
        (_op(op="add_index", table="orders", name="ix", columns=["a", "b;c"]),
         "operations[1].columns[1]: must be an identifier"),
        (_op(op="drop_column", table="orders", column="x", grace_seconds=-1),
         "operations[1].grace_seconds: must be an integer from 0"),
        (_op(op="drop_column", table="orders", column="x", grace_seconds=1.5),
         "operations[1].grace_seconds: must be an integer"),
        (_op(op="change_column_type", table="orders", column="x", type="TEXT", online="yes"),
         "operations[1].online: must be true or false"),
        (_op(op="custom", plugin="sample", params={}), "operations[1].rollback: required"),
        (_op(op="custom", plugin="sample", rollback=[]),
         "operations[1].rollback: must be an object"),
        (_op(op="custom", plugin="a b", rollback={}),
         "operations[1].plugin: must be a plugin name"),
        (_op(op="custom", plugin="sample", params=3, rollback={}),
         "operations[1].params: must be an object"),
    ],
)  # fmt: skip
def test_each_refusal_names_the_file_and_the_field(doc: object, message: str) -> None:
    assert message in _refused(doc)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"[1, 2",
        b'{"version": "0002", "version": "0002"}',
        b'{"version": NaN}',
        b"[]",
    ],
    ids=["not-utf8", "not-json", "duplicate-key", "nan", "not-an-object"],
)
def test_malformed_files_are_refused(raw: bytes) -> None:
    with pytest.raises(ManifestInvalid, match=r"^migrations/0002\.json: "):
        parse_migration(raw, name=NAME)


@pytest.mark.parametrize(
    "name",
    [
        'orders"; DROP TABLE orders; --',
        "orders;",
        "1orders",
        "",
        "x" * 64,
        "naïve",
        "orders\x00",
        "_themis_old_orders_0001",
        "themis_schema_history",
    ],
)
def test_names_that_are_not_plain_identifiers_are_refused(name: str) -> None:
    for doc, field in [
        (_op(op="add_column", table=name, column="x", type="TEXT"), "operations[1].table"),
        (_op(op="add_column", table="orders", column=name, type="TEXT"), "operations[1].column"),
        (_op(op="add_index", table="orders", name=name, columns=["a"]), "operations[1].name"),
        (_op(op="rename_column", table="orders", **{"from": "a", "to": name}), "operations[1].to"),
    ]:
        assert f"{field}: " in _refused(doc)


def test_operations_round_trip_through_the_stored_json() -> None:
    ops = mig(
        "0002",
        [
            {**ADD, "nullable": False, "default": "it's"},
            {"op": "add_index", "table": "t", "name": "ix", "columns": ["a", "b"], "unique": True,
             "online": True},
            {"op": "drop_column", "table": "t", "column": "c", "grace_seconds": 5},
            {"op": "change_column_type", "table": "t", "column": "c", "type": "BIGINT"},
            {"op": "custom", "plugin": "sample", "params": {"k": [1]}, "rollback": {}},
        ],
    ).operations  # fmt: skip
    assert operations_from_json(operations_to_json(ops)) == ops
    assert isinstance(ops[-1], Custom) and ops[-1].params == {"k": [1]}
    with pytest.raises(ManifestInvalid, match="themis_schema_history.operations"):
        operations_from_json('[{"op": "add_column", "table": "x; --"}]')


def test_literals_and_names_are_rendered_safely() -> None:
    assert literal("it's'; DROP TABLE orders; --") == "'it''s''; DROP TABLE orders; --'"
    assert literal(None) == "NULL" and literal(True) == "TRUE" and literal(2.5) == "2.5"
    assert quote('we"ird') == '"we""ird"'
    with pytest.raises(ValueError, match="NUL"):
        literal("a\x00b")


def test_a_hostile_default_is_stored_as_data(db: Db) -> None:
    db.seed_orders(3)
    hostile = "x'); DROP TABLE orders; -- ? %s $1 \\"
    op = {"op": "add_column", "table": "orders", "column": "remark", "type": "TEXT",
          "default": hostile}  # fmt: skip
    with db.migrator() as m:
        m.apply(mig("0001", [op]))
    assert db.query("SELECT DISTINCT remark FROM orders") == [(hostile,)]
    assert "orders" in db.tables()
