"""The migration model: what a `migrations/<version>.json` file says, once validated,
and what the migrator reports back. Plain frozen dataclasses; parsing and
validation live in `parse.py`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """Expand runs before any node of a cluster takes the new code (old and new code
    must both work with it); contract runs once every node runs the new code."""

    EXPAND = "expand"
    CONTRACT = "contract"


class ColumnType(StrEnum):
    """The column types a migration may name; each dialect maps them to its own."""

    INTEGER = "INTEGER"
    BIGINT = "BIGINT"
    TEXT = "TEXT"
    REAL = "REAL"
    NUMERIC = "NUMERIC"
    BOOLEAN = "BOOLEAN"
    TIMESTAMP = "TIMESTAMP"
    BLOB = "BLOB"
    BYTEA = "BYTEA"


class OpKind(StrEnum):
    ADD_COLUMN = "add_column"
    RENAME_COLUMN = "rename_column"
    ADD_INDEX = "add_index"
    DROP_COLUMN = "drop_column"
    CHANGE_COLUMN_TYPE = "change_column_type"
    CUSTOM = "custom"


# A JSON scalar as a column default: rendered as a SQL literal, never as SQL.
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class AddColumn:
    table: str
    column: str
    type: ColumnType
    nullable: bool = True
    default: Scalar = None
    kind: OpKind = field(default=OpKind.ADD_COLUMN, init=False)


@dataclass(frozen=True)
class RenameColumn:
    table: str
    old: str  # "from" in the file
    new: str  # "to" in the file
    kind: OpKind = field(default=OpKind.RENAME_COLUMN, init=False)


@dataclass(frozen=True)
class AddIndex:
    table: str
    name: str
    columns: tuple[str, ...]
    unique: bool = False
    online: bool = False
    kind: OpKind = field(default=OpKind.ADD_INDEX, init=False)


@dataclass(frozen=True)
class DropColumn:
    table: str
    column: str
    grace_seconds: int = 0
    kind: OpKind = field(default=OpKind.DROP_COLUMN, init=False)


@dataclass(frozen=True)
class ChangeColumnType:
    table: str
    column: str
    type: ColumnType
    online: bool = False
    kind: OpKind = field(default=OpKind.CHANGE_COLUMN_TYPE, init=False)


@dataclass(frozen=True)
class Custom:
    """Handled by a migration plugin; `rollback` holds the parameters of its inverse
    (an empty mapping: the plugin's rollback with no parameters)."""

    plugin: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    rollback: Mapping[str, Any] = field(default_factory=dict, hash=False)
    kind: OpKind = field(default=OpKind.CUSTOM, init=False)


Operation = AddColumn | RenameColumn | AddIndex | DropColumn | ChangeColumnType | Custom


@dataclass(frozen=True)
class Migration:
    version: str  # decimal digits; ordered by int(version)
    phase: Phase
    description: str
    operations: tuple[Operation, ...]
    checksum: str  # SHA-256 hex of the file's bytes

    @property
    def number(self) -> int:
        return int(self.version)


class Outcome(StrEnum):
    """What one call did to one migration (MigrationResult.outcome)."""

    APPLIED = "applied"
    ALREADY_APPLIED = "already_applied"
    ROLLED_BACK = "rolled_back"
    NOTHING_TO_DO = "nothing_to_do"


class HistoryOutcome(StrEnum):
    """How one attempt ended (a row of themis_schema_history)."""

    APPLIED = "applied"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


@dataclass(frozen=True)
class MigrationResult:
    version: str
    phase: Phase
    outcome: str  # an Outcome value
    seconds: float
    steps: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "phase": str(self.phase),
            "outcome": str(self.outcome),
            "seconds": round(self.seconds, 6),
            "steps": list(self.steps),
        }


@dataclass(frozen=True)
class HistoryEntry:
    version: str
    checksum: str
    phase: Phase
    description: str
    started_at: datetime  # UTC
    finished_at: datetime  # UTC
    duration_ms: int
    outcome: str  # a HistoryOutcome value
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "checksum": self.checksum,
            "phase": str(self.phase),
            "description": self.description,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "duration_ms": self.duration_ms,
            "outcome": str(self.outcome),
            "error": self.error,
        }
