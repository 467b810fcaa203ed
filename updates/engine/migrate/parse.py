"""Parsing and strict validation of `migrations/<version>.json`.

Every refusal raises ManifestInvalid naming the file and the field, e.g.
`migrations/0002.json: operations[1].column: required`. Unknown keys are refused, names
must be plain identifiers (the only text of a file that ever reaches SQL), types come from
an allow-list and defaults are JSON scalars, rendered later as SQL literals.

The same functions turn the operations stored in the history table back into objects, so a
rollback re-validates what it reads from the database instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any, TypeVar

from ..errors import ManifestInvalid
from .model import (
    AddColumn,
    AddIndex,
    ChangeColumnType,
    ColumnType,
    Custom,
    DropColumn,
    Migration,
    Operation,
    OpKind,
    Phase,
    RenameColumn,
    Scalar,
)

MAX_FILE_BYTES = 1 << 20
MAX_OPERATIONS = 256
MAX_INDEX_COLUMNS = 32
MAX_DESCRIPTION = 500
MAX_DEFAULT_CHARS = 1000
MAX_GRACE_SECONDS = 10 * 366 * 86400
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
VERSION = re.compile(r"[0-9]{1,18}")
PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# Names the migrator keeps for itself: its bookkeeping tables and every helper object
# (shadow tables, triggers, hidden columns) start with these.
RESERVED_PREFIXES = ("_themis_", "themis_schema_", "themis_online_", "themis_pending_")

E = TypeVar("E", Phase, ColumnType, OpKind)

_TOP_KEYS = {"version", "phase", "description", "operations"}
_OP_KEYS: dict[OpKind, tuple[set[str], set[str]]] = {  # kind -> (required, optional)
    OpKind.ADD_COLUMN: ({"table", "column", "type"}, {"nullable", "default"}),
    OpKind.RENAME_COLUMN: ({"table", "from", "to"}, set()),
    OpKind.ADD_INDEX: ({"table", "name", "columns"}, {"unique", "online"}),
    OpKind.DROP_COLUMN: ({"table", "column"}, {"grace_seconds"}),
    OpKind.CHANGE_COLUMN_TYPE: ({"table", "column", "type"}, {"online"}),
    OpKind.CUSTOM: ({"plugin", "rollback"}, {"params"}),
}


class _Invalid(Exception):
    """A field-level refusal; `parse_migration` adds the file name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def parse_migration(data: bytes, *, name: str) -> Migration:
    """Validate a migration file. `name` is its bundle path, `migrations/<version>.json`;
    the file's version must be the one in its name."""
    try:
        return _parse(data, name)
    except _Invalid as exc:
        raise ManifestInvalid(f"{name}: {exc}") from None


def _parse(data: bytes, name: str) -> Migration:
    if len(data) > MAX_FILE_BYTES:
        raise _Invalid("file", f"larger than {MAX_FILE_BYTES} bytes")
    doc = _load_json(data)
    if not isinstance(doc, dict):
        raise _Invalid("file", "must be a JSON object")
    _check_keys(doc, _TOP_KEYS, set(), "")
    version = _version(doc["version"], name)
    phase = _enum(Phase, doc["phase"], "phase")
    description = _text(doc["description"], "description", MAX_DESCRIPTION)
    operations = parse_operations(doc["operations"])
    checksum = hashlib.sha256(data).hexdigest()
    return Migration(version, phase, description, operations, checksum)


def parse_operations(raw: object) -> tuple[Operation, ...]:
    """The `operations` list (also the JSON stored in the history table)."""
    if not isinstance(raw, list):
        raise _Invalid("operations", "must be a list")
    if not raw:
        raise _Invalid("operations", "at least one operation is required")
    if len(raw) > MAX_OPERATIONS:
        raise _Invalid("operations", f"at most {MAX_OPERATIONS} operations")
    return tuple(_operation(item, f"operations[{i}]") for i, item in enumerate(raw))


def operations_from_json(text: str) -> tuple[Operation, ...]:
    """Operations stored by the migrator; a corrupt row is refused like a bad file."""
    try:
        return parse_operations(json.loads(text))
    except (_Invalid, ValueError) as exc:
        raise ManifestInvalid(f"themis_schema_history.operations: {exc}") from None


def _load_json(data: bytes) -> object:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise _Invalid(dup, "appears twice")
        return dict(pairs)

    def no_constant(token: str) -> object:
        raise _Invalid("file", f"{token} is not JSON")

    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant
        )
    except UnicodeDecodeError:
        raise _Invalid("file", "not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _Invalid("file", f"not JSON ({exc.msg} at line {exc.lineno})") from None


def _check_keys(obj: Mapping[str, object], required: set[str], optional: set[str], at: str) -> None:
    prefix = f"{at}." if at else ""
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        raise _Invalid(f"{prefix}{unknown[0]}", "unknown key")
    missing = sorted(required - set(obj))
    if missing:
        raise _Invalid(f"{prefix}{missing[0]}", "required")


def _operation(raw: object, at: str) -> Operation:
    if not isinstance(raw, dict):
        raise _Invalid(at, "must be an object")
    if "op" not in raw:
        raise _Invalid(f"{at}.op", "required")
    kind = _enum(OpKind, raw["op"], f"{at}.op")
    required, optional = _OP_KEYS[kind]
    _check_keys(raw, required | {"op"}, optional, at)
    return _BUILDERS[kind](raw, at)


def _add_column(raw: dict[str, Any], at: str) -> Operation:
    type_ = _enum(ColumnType, raw["type"], f"{at}.type")
    nullable = _bool(raw.get("nullable", True), f"{at}.nullable")
    default = _default(raw.get("default"), type_, f"{at}.default")
    if not nullable and default is None:
        # Existing rows need a value: a NOT NULL column without a default cannot be added
        # without rewriting every row.
        raise _Invalid(f"{at}.default", "required when nullable is false")
    return AddColumn(
        _table(raw, at), _ident(raw["column"], f"{at}.column"), type_, nullable, default
    )


def _rename_column(raw: dict[str, Any], at: str) -> Operation:
    old = _ident(raw["from"], f"{at}.from")
    new = _ident(raw["to"], f"{at}.to")
    if old == new:
        raise _Invalid(f"{at}.to", "must differ from `from`")
    return RenameColumn(_table(raw, at), old, new)


def _add_index(raw: dict[str, Any], at: str) -> Operation:
    cols = raw["columns"]
    if not isinstance(cols, list) or not cols or len(cols) > MAX_INDEX_COLUMNS:
        raise _Invalid(f"{at}.columns", f"must be a list of 1 to {MAX_INDEX_COLUMNS} columns")
    columns = tuple(_ident(c, f"{at}.columns[{i}]") for i, c in enumerate(cols))
    if len(set(columns)) != len(columns):
        raise _Invalid(f"{at}.columns", "names a column twice")
    return AddIndex(
        _table(raw, at),
        _ident(raw["name"], f"{at}.name"),
        columns,
        _bool(raw.get("unique", False), f"{at}.unique"),
        _bool(raw.get("online", False), f"{at}.online"),
    )


def _drop_column(raw: dict[str, Any], at: str) -> Operation:
    grace = raw.get("grace_seconds", 0)
    if not _is_int(grace) or not 0 <= grace <= MAX_GRACE_SECONDS:
        raise _Invalid(f"{at}.grace_seconds", f"must be an integer from 0 to {MAX_GRACE_SECONDS}")
    return DropColumn(_table(raw, at), _ident(raw["column"], f"{at}.column"), grace)


def _change_column_type(raw: dict[str, Any], at: str) -> Operation:
    return ChangeColumnType(
        _table(raw, at),
        _ident(raw["column"], f"{at}.column"),
        _enum(ColumnType, raw["type"], f"{at}.type"),
        _bool(raw.get("online", False), f"{at}.online"),
    )


def _custom(raw: dict[str, Any], at: str) -> Operation:
    plugin = raw["plugin"]
    if not isinstance(plugin, str) or not PLUGIN_NAME.fullmatch(plugin):
        raise _Invalid(f"{at}.plugin", "must be a plugin name (letters, digits, _ . -)")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise _Invalid(f"{at}.params", "must be an object")
    if not isinstance(raw["rollback"], dict):
        raise _Invalid(f"{at}.rollback", "must be an object ({} for the plugin's own inverse)")
    return Custom(plugin, params, raw["rollback"])


_BUILDERS: dict[OpKind, Callable[[dict[str, Any], str], Operation]] = {
    OpKind.ADD_COLUMN: _add_column,
    OpKind.RENAME_COLUMN: _rename_column,
    OpKind.ADD_INDEX: _add_index,
    OpKind.DROP_COLUMN: _drop_column,
    OpKind.CHANGE_COLUMN_TYPE: _change_column_type,
    OpKind.CUSTOM: _custom,
}


def _version(raw: object, name: str) -> str:
    if not isinstance(raw, str) or not VERSION.fullmatch(raw):
        raise _Invalid("version", "must be a string of 1 to 18 decimal digits")
    stem = PurePosixPath(name).name.removesuffix(".json")
    if raw != stem:
        raise _Invalid("version", f"{raw!r} does not match the file name {name!r}")
    return raw


def _table(raw: dict[str, Any], at: str) -> str:
    return _ident(raw["table"], f"{at}.table")


def _ident(raw: object, field: str) -> str:
    if not isinstance(raw, str) or not IDENTIFIER.fullmatch(raw):
        raise _Invalid(
            field, "must be an identifier (a letter or _, then letters, digits, _; ≤ 63)"
        )
    if raw.lower().startswith(RESERVED_PREFIXES):
        raise _Invalid(field, f"{raw!r} is reserved for the migrator")
    return raw


def _enum(enum: type[E], raw: object, field: str) -> E:
    values = [str(m.value) for m in enum]
    if not isinstance(raw, str) or raw not in values:
        raise _Invalid(field, f"must be one of {', '.join(values)}")
    return enum(raw)


def _text(raw: object, field: str, limit: int) -> str:
    if not isinstance(raw, str) or len(raw) > limit or "\x00" in raw:
        raise _Invalid(field, f"must be text of at most {limit} characters")
    return raw


def _bool(raw: object, field: str) -> bool:
    if not isinstance(raw, bool):
        raise _Invalid(field, "must be true or false")
    return raw


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _default(raw: object, type_: ColumnType, field: str) -> Scalar:
    """A default must be a JSON scalar of the column's kind."""
    if raw is None:
        return None
    if type_ in (ColumnType.INTEGER, ColumnType.BIGINT):
        ok = _is_int(raw) and abs(raw) < 2**63  # type: ignore[arg-type]
    elif type_ in (ColumnType.REAL, ColumnType.NUMERIC):
        ok = (_is_int(raw) and abs(raw) < 2**63) or (  # type: ignore[arg-type]
            isinstance(raw, float) and math.isfinite(raw)
        )
    elif type_ is ColumnType.BOOLEAN:
        ok = isinstance(raw, bool)
    elif type_ in (ColumnType.TEXT, ColumnType.TIMESTAMP):
        return _text_default(raw, field)
    else:
        raise _Invalid(field, f"a {type_} column takes no default")
    if not ok:
        raise _Invalid(field, f"must be a JSON value of a {type_} column")
    return raw  # type: ignore[return-value]


def _text_default(raw: object, field: str) -> str:
    text = _text(raw, field, MAX_DEFAULT_CHARS)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        # Most likely SQL quoting copied into the file: the value would keep its quotes.
        raise _Invalid(field, f"is a JSON value, not SQL: write {text[1:-1]!r} without quotes")
    return text


def operation_to_dict(op: Operation) -> dict[str, Any]:
    """The file form of an operation (what parse_operations reads back)."""
    if isinstance(op, AddColumn):
        return {"op": str(op.kind), "table": op.table, "column": op.column,
                "type": str(op.type), "nullable": op.nullable, "default": op.default}  # fmt: skip
    if isinstance(op, RenameColumn):
        return {"op": str(op.kind), "table": op.table, "from": op.old, "to": op.new}
    if isinstance(op, AddIndex):
        return {"op": str(op.kind), "table": op.table, "name": op.name,
                "columns": list(op.columns), "unique": op.unique, "online": op.online}  # fmt: skip
    if isinstance(op, DropColumn):
        return {"op": str(op.kind), "table": op.table, "column": op.column,
                "grace_seconds": op.grace_seconds}  # fmt: skip
    if isinstance(op, ChangeColumnType):
        return {"op": str(op.kind), "table": op.table, "column": op.column,
                "type": str(op.type), "online": op.online}  # fmt: skip
    return {"op": str(op.kind), "plugin": op.plugin, "params": dict(op.params),
            "rollback": dict(op.rollback)}  # fmt: skip


def operations_to_json(ops: tuple[Operation, ...]) -> str:
    return json.dumps([operation_to_dict(op) for op in ops], sort_keys=True)
