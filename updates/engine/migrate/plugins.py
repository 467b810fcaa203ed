"""Migration plugins: code that carries out a `custom` operation and its inverse.

A plugin is found through the entry point group `themis_update.migration_plugins`; each
entry point loads a plugin class (instantiated without arguments) or a plugin instance.
The first plugin whose `can_handle(op)` is true runs the operation, inside the
migrator's transaction, on the migrator's connection.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from ..errors import MigrationFailed
from .connection import Connection
from .model import Custom

ENTRY_POINT_GROUP = "themis_update.migration_plugins"


@runtime_checkable
class MigrationPlugin(Protocol):
    name: str
    version: str

    def can_handle(self, op: Custom) -> bool: ...

    def apply(self, conn: Connection, op: Custom) -> None: ...

    def rollback(self, conn: Connection, op: Custom) -> None:
        """Undo `apply`; `op.rollback` holds the file's parameters for it."""
        ...


def discover_plugins() -> list[MigrationPlugin]:
    """Every installed plugin, in entry point name order. A plugin that does not load or
    is not a plugin stops the migration (MigrationFailed naming the entry point): better
    than running a migration with part of its code missing."""
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            loaded = ep.load()
            plugin = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:
            raise MigrationFailed(f"migration plugin {ep.name} ({ep.value}): {exc}") from exc
        if not isinstance(plugin, MigrationPlugin):
            raise MigrationFailed(
                f"migration plugin {ep.name} ({ep.value}): lacks name, version, can_handle,"
                " apply or rollback"
            )
        found.append(plugin)
    return found


def plugin_for(plugins: list[MigrationPlugin], op: Custom) -> MigrationPlugin:
    for plugin in plugins:
        if plugin.can_handle(op):
            return plugin
    names = ", ".join(f"{p.name} {p.version}" for p in plugins) or "none installed"
    raise LookupError(f"no migration plugin handles plugin {op.plugin!r} (plugins: {names})")
