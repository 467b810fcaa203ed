"""What an operation runs with (ops.py, grace.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .connection import Connection
from .online import Tuning
from .plugins import MigrationPlugin

Undo = dict[str, Any]


@dataclass
class OpContext:
    conn: Connection
    version: str
    op_index: int
    now: datetime
    state_dir: Path
    tuning: Tuning
    plugins: Callable[[], list[MigrationPlugin]]
    # Called inside the operation's last transaction: counts it done (or undone) and
    # keeps what its inverse will need.
    done: Callable[[Undo], None]
