"""Restore point retention: by count, age and disk use, under the node lock.

`cleanup_points` is what `themis-update prune` and the node agent's periodic cleanup
run: it takes the node lock (exit 21 while an update holds it), works out which points
are needed (restore.needed_points: a pending journal's, the installed version's
rollback point), renames the doomed points aside and lets go of the lock before their
bytes are deleted, so the lock is held for milliseconds, not for a large rmtree.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .lock import NodeLock
from .restore import PARTIAL_PREFIX, needed_points, points_root, prune
from .state import fsync_dir

DEFAULT_KEEP = 3

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:ib|b)?|b)?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Retention:
    """None switches a rule off."""

    keep: int | None = DEFAULT_KEEP  # the newest N points
    max_age: float | None = None  # seconds
    max_bytes: int | None = None  # the points' disk use together (restore.DiskUse)

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep < 0:
            raise UsageError(f"keep: {self.keep} is negative")
        if self.max_age is not None and self.max_age < 0:
            raise UsageError(f"max-age: {self.max_age} is negative")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise UsageError(f"max-bytes: {self.max_bytes} is negative")


def parse_duration(text: str) -> float:
    """Seconds from `3600`, `90m`, `36h`, `7d` or `2w`; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected seconds or a number with s, m, h, d or w")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes from `1073741824`, `500M`, `2G`, `1.5GiB` (K, M, G, T: powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected bytes or a number with K, M, G or T")
    return int(float(match.group(1)) * _BYTES[(match.group(2) or "").lower()])


def cleanup_points(state_dir: Path | str, retention: Retention) -> list[str]:
    """Apply `retention` under the node lock (AlreadyInProgress, exit 21, while held);
    returns the deleted point ids, oldest first."""
    state_dir = Path(state_dir)
    with NodeLock(state_dir, command="cleanup"):
        deleted = prune(
            state_dir,
            retention.keep,
            max_age=retention.max_age,
            max_bytes=retention.max_bytes,
            protect=needed_points(state_dir),
            remove=False,
        )
    root = points_root(state_dir)
    for point_id in deleted:
        # Renamed under the lock; a crash from here on leaves `.tmp-` dirs the next
        # recover sweeps.
        shutil.rmtree(root / f"{PARTIAL_PREFIX}del-{point_id}", ignore_errors=True)
    if deleted:
        fsync_dir(root)
    return deleted
