"""The apply/rollback journal: one JSON file in the state dir, replaced
atomically and made durable before every transition, so `recover` always knows
how far an interrupted update got.

Apply states, in order (DESIGN.md):

    LOCKED -> STAGED -> RESTORE_POINT -> SWITCHING -> SWITCHED -> VERIFYING -> COMMITTED

Before COMMITTED nothing is final: recover undoes it from the restore point.
From COMMITTED on, recover finishes it. A journal that is closed is renamed to
`journal.last.json` (kept for diagnosis) so only `journal.json` means pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import EngineError
from .state import fsync_dir, write_json_atomic

JOURNAL_FILE = "journal.json"
LAST_JOURNAL_FILE = "journal.last.json"

LOCKED = "LOCKED"
STAGED = "STAGED"
RESTORE_POINT = "RESTORE_POINT"
SWITCHING = "SWITCHING"
SWITCHED = "SWITCHED"
VERIFYING = "VERIFYING"
COMMITTED = "COMMITTED"
APPLY_STATES = (LOCKED, STAGED, RESTORE_POINT, SWITCHING, SWITCHED, VERIFYING, COMMITTED)
# States in which the target may already differ from the old version.
TARGET_TOUCHED = (SWITCHING, SWITCHED, VERIFYING)
# Terminal outcomes written just before the journal is closed.
DONE = "DONE"
ROLLED_BACK = "ROLLED_BACK"
ABORTED = "ABORTED"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Journal:
    """A pending operation; every `advance` is durable before it returns."""

    def __init__(self, state_dir: Path, data: dict[str, Any]) -> None:
        self.state_dir = Path(state_dir)
        self.data = data

    @property
    def path(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    @property
    def state(self) -> str:
        return str(self.data["state"])

    @property
    def txid(self) -> str:
        return str(self.data["txid"])

    @property
    def op(self) -> str:
        return str(self.data["op"])

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @classmethod
    def begin(cls, state_dir: Path, op: str, **fields: Any) -> Journal:
        if (Path(state_dir) / JOURNAL_FILE).exists():
            # Callers recover first; reaching this means a bug, not a user error.
            raise EngineError(f"journal: {state_dir / JOURNAL_FILE} is still pending")
        data = {"op": op, "txid": uuid.uuid4().hex[:16], "history": [], **fields}
        journal = cls(state_dir, data)
        journal.advance(LOCKED)
        return journal

    @classmethod
    def load(cls, state_dir: Path) -> Journal | None:
        try:
            raw = (Path(state_dir) / JOURNAL_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            _ = data["op"], data["state"], data["txid"]
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically by us, so this is outside damage: refuse to guess.
            raise EngineError(f"journal: {state_dir / JOURNAL_FILE} is unreadable: {exc}") from exc
        return cls(state_dir, data)

    def advance(self, state: str, **fields: Any) -> None:
        self.data.update(fields)
        self.data["state"] = state
        self.data["history"].append({"state": state, "at": _now()})
        write_json_atomic(self.path, self.data)

    def close(self, outcome: str) -> None:
        """Mark the operation finished; after this `recover` has nothing to do."""
        self.data["state"] = outcome
        self.data["history"].append({"state": outcome, "at": _now()})
        write_json_atomic(self.state_dir / LAST_JOURNAL_FILE, self.data)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fsync_dir(self.state_dir)
