"""The node lock: one apply, rollback or recover per state dir at a time.

`flock` rather than a PID file: the kernel drops the lock the instant the
holder dies (even by SIGKILL), so a crash never leaves a stale lock behind and
nobody has to guess whether a recorded PID is still alive. The lock file is
never deleted: deleting it would let a second process lock a new inode while
the first still holds the old one.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from .errors import AlreadyInProgress

LOCK_FILE = "lock"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    try:
        return Path(BOOT_ID_PATH).read_text().strip()
    except OSError:
        return None


def read_holder(state_dir: Path) -> dict[str, object]:
    """Best-effort view of who holds (or last held) the lock, for diagnosis only."""
    try:
        return dict(json.loads((Path(state_dir) / LOCK_FILE).read_bytes() or b"{}"))
    except (OSError, ValueError, TypeError):
        return {}


class NodeLock:
    """Exclusive, non-blocking lock on `<state_dir>/lock`; a context manager."""

    def __init__(self, state_dir: Path, *, command: str = "apply") -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> NodeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a health command or restarted daemon must never inherit the
        # lock, or the lock would outlive this process.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyInProgress(self._held_message()) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._write_holder()
        return self

    def _held_message(self) -> str:
        holder = read_holder(self.path.parent)
        who = f"pid {holder.get('pid', '?')} ({holder.get('command', '?')})"
        if holder.get("boot_id") not in (None, boot_id()):
            who += " from an earlier boot"
        return f"lock: {self.path} is held by {who}; another update is in progress"

    def _write_holder(self) -> None:
        assert self.fd is not None
        info = {
            "pid": os.getpid(),
            "boot_id": boot_id(),
            "command": self.command,
            "argv": sys.argv[:4],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> NodeLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
