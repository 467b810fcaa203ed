"""A probe of file locks, for tests and for the test harness (no pytest here: the
benchmarks use tests/postgres.py, which uses it)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def flock_is_free(path: Path) -> bool:
    """Whether an exclusive flock on `path` could be taken now (no other open file holds
    one). Taken and dropped at once: a probe, not a lock."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
