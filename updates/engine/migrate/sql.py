"""Rendering the few things that enter SQL text: quoted names and literals.

Names from a migration file are identifiers (checked in parse.py); names read from the
database's own catalog are quoted with doubled quotes. Values are literals built here from
JSON scalars, never text copied from a file. Type and default text read from a SQLite
schema is reused only when it matches a plain shape (`safe_type`, `safe_default`).
"""

from __future__ import annotations

import hashlib
import math
import re

from .model import Scalar

MAX_NAME = 63  # PostgreSQL truncates longer names; keep every helper name within it

_SAFE_TYPE = re.compile(
    r"[A-Za-z][A-Za-z0-9_ ]{0,60}(\(\s*\d{1,4}\s*(,\s*\d{1,4}\s*)?\))?"
    r"( with(out)? time zone)?(\[\])?"
)
# A constant, with PostgreSQL's casts if any (`'new'::text`, `('0'::text)::bigint`).
_SAFE_DEFAULT = re.compile(
    r"\(*(NULL|TRUE|FALSE|CURRENT_TIME|CURRENT_DATE|CURRENT_TIMESTAMP"
    r"|[-+]?\d+(\.\d+)?([eE][-+]?\d+)?|'([^']|'')*'|[Xx]'[0-9A-Fa-f]*')\)*"
    r"(::[a-z][a-z ]{0,40}(\(\d{1,4}(,\d{1,4})?\))?\)*){0,8}",
    re.IGNORECASE,
)


def quote(name: str) -> str:
    """A quoted identifier: always quoted, so case and keywords cannot change meaning."""
    if "\x00" in name or not name:
        raise ValueError(f"not a usable name: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def qlist(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(quote(n) for n in names)


def literal(value: Scalar) -> str:
    """A JSON scalar as a SQL literal (standard_conforming_strings: '' is the only
    escape inside a string)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a default must be a finite number")
        return repr(value)
    if "\x00" in value:
        raise ValueError("a text default cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def safe_type(text: str) -> bool:
    """A type name read from the catalog that may be written back into DDL (empty: a
    SQLite column without a declared type)."""
    return text == "" or _SAFE_TYPE.fullmatch(text) is not None


def safe_default(text: str) -> bool:
    """A SQLite default expression read from the schema that is a plain constant."""
    return _SAFE_DEFAULT.fullmatch(text.strip()) is not None


def aux_name(prefix: str, *parts: str) -> str:
    """A helper object's name, `<prefix>_<parts...>`; hashed when it would exceed
    PostgreSQL's 63 characters (which would silently truncate it)."""
    name = "_".join((prefix, *parts))
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{prefix}_{digest}"
