"""Schema migrations of the node database, Django-free: the `migrations/<version>.json`
format, the SchemaMigrator (apply, rollback, history, resume after a crash), online DDL on
SQLite and PostgreSQL, drops with a grace period, and migration plugins.

See docs/bundle-format.md for the file format; each module says how its part works."""

from .connection import DATABASE_URL_ENV, Connection, Dialect, database_url_for
from .migrator import SchemaMigrator
from .model import (
    AddColumn,
    AddIndex,
    ChangeColumnType,
    ColumnType,
    Custom,
    DropColumn,
    HistoryEntry,
    HistoryOutcome,
    Migration,
    MigrationResult,
    Operation,
    OpKind,
    Outcome,
    Phase,
    RenameColumn,
)
from .parse import parse_migration
from .plugins import ENTRY_POINT_GROUP, MigrationPlugin, discover_plugins

__all__ = [
    "DATABASE_URL_ENV",
    "ENTRY_POINT_GROUP",
    "AddColumn",
    "AddIndex",
    "ChangeColumnType",
    "ColumnType",
    "Connection",
    "Custom",
    "Dialect",
    "DropColumn",
    "HistoryEntry",
    "HistoryOutcome",
    "Migration",
    "MigrationPlugin",
    "MigrationResult",
    "OpKind",
    "Operation",
    "Outcome",
    "Phase",
    "RenameColumn",
    "SchemaMigrator",
    "database_url_for",
    "discover_plugins",
    "parse_migration",
]
