"""A sample migration plugin, installed in the tests through a real entry point
(test_plugins.py): it backfills a computed column, `target = left * right`, for every row,
and its rollback resets the column to the value its `rollback` parameters name."""

from __future__ import annotations

import re

from updates.engine.migrate import Connection, Custom

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _ident(value: object) -> str:
    """A plugin renders its own SQL: it too quotes only names it has checked."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"sample plugin: {value!r} is not a name")
    return f'"{value}"'


class SamplePlugin:
    name = "sample"
    version = "1.2.0"

    def can_handle(self, op: Custom) -> bool:
        return op.plugin == self.name

    def apply(self, conn: Connection, op: Custom) -> None:
        table, target = _ident(op.params["table"]), _ident(op.params["target"])
        left, right = _ident(op.params["left"]), _ident(op.params["right"])
        conn.execute(f"UPDATE {table} SET {target} = {left} * {right}")  # noqa: S608

    def rollback(self, conn: Connection, op: Custom) -> None:
        table, target = _ident(op.params["table"]), _ident(op.params["target"])
        reset = op.rollback.get("reset_to")
        conn.execute(f"UPDATE {table} SET {target} = ?", (reset,))  # noqa: S608
