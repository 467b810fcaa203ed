"""Retention of the audit log: events older than the kept days are written to gzip'd JSON-lines
files, then deleted. This is the only way an Event leaves the table, and it is audited.

Each batch goes through three states on disk, so a run killed at any point is finished by the
next one without losing or repeating an event:

1. `<name>.tmp`     written and fsync'd; the rows are still in the table. A leftover is removed.
2. `<name>.pending` renamed from .tmp (atomic): a complete archive of rows not yet deleted. The
                    next run deletes exactly the ids it holds before exporting anything else,
                    so none of them is exported twice.
3. `<name>`         renamed from .pending once the rows are gone: a finished archive.

On PostgreSQL (monthly partitions, updates/events/partitions.py) a month entirely past retention
is written out the same way, then dropped whole instead of deleted row by row: its files stay
.pending until the drop has committed, and the drop happens only if the month holds exactly the
rows written out (checked under a lock). A run killed between the two finishes the .pending
files the ordinary way, by deleting their ids.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from updates.audit import event_log
from updates.events import partitions
from updates.models import Event

log = logging.getLogger(__name__)

SUFFIX = ".jsonl.gz"
PENDING = ".pending"
TEMP = ".tmp"
BATCH_SIZE = 10_000
# Ids per DELETE statement: under SQLite's bound-parameter limit on every version.
DELETE_CHUNK = 500
FIELDS = (
    "id",
    "created_at",
    "actor_id",
    "actor_label",
    "tenant_id",
    "object_type",
    "object_id",
    "verb",
    "details",
)


class ArchiveBusy(Exception):
    """Another run holds the archive directory's lock."""


@dataclass
class ArchiveResult:
    cutoff: datetime | None = None
    archived: int = 0  # rows deleted from the table by this run, each in a file
    files: list[str] = field(default_factory=list)
    resumed: int = 0  # files a previous, interrupted run had written


def events_archive(
    *,
    keep_days: int,
    directory: Path,
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
    max_batches: int | None = None,
) -> ArchiveResult:
    """Archive then delete the events older than `keep_days` (0: keep every event)."""
    if keep_days <= 0:
        return ArchiveResult()
    cutoff = (now or timezone.now()) - timedelta(days=keep_days)
    result = ArchiveResult(cutoff=cutoff)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        for leftover in directory.glob(f"*{TEMP}"):
            leftover.unlink()
        for pending in sorted(directory.glob(f"*{SUFFIX}{PENDING}")):
            result.archived += _finish(pending)
            result.files.append(pending.name.removesuffix(PENDING))
            result.resumed += 1
        for month in partitions.months_before(cutoff):
            _archive_month(directory, month, batch_size, result)
        batches = 0
        while max_batches is None or batches < max_batches:
            rows = _oldest_rows(Event.objects.filter(created_at__lt=cutoff), batch_size)
            if not rows:
                break
            pending = _write_pending(directory, rows)
            result.archived += _finish(pending)
            result.files.append(pending.name.removesuffix(PENDING))
            batches += 1
    if result.archived or result.resumed:
        event_log(
            verb="events.archived",
            details={
                "count": result.archived,
                "files": len(result.files),
                "first_file": result.files[0],
                "last_file": result.files[-1],
                "directory": str(directory),
                "cutoff": cutoff.isoformat(),
                "keep_days": keep_days,
            },
        )
        log.info(
            "archived %d events to %d files in %s", result.archived, len(result.files), directory
        )
    return result


def _oldest_rows(events: Any, batch_size: int) -> list[dict[str, Any]]:
    rows = events.order_by("created_at", "id").values_list(*FIELDS)[:batch_size]
    return [dict(zip(FIELDS, row, strict=True)) for row in rows]


def _archive_month(
    directory: Path, month: partitions.MonthPartition, batch_size: int, result: ArchiveResult
) -> None:
    """Write out one month partition's rows in batches, then drop the partition whole."""
    pendings: list[Path] = []
    written = 0
    in_month = Event.objects.filter(created_at__gte=month.start, created_at__lt=month.end)
    while rows := _oldest_rows(in_month, batch_size):
        pendings.append(_write_pending(directory, rows))
        written += len(rows)
        last = rows[-1]
        in_month = in_month.filter(
            Q(created_at__gt=last["created_at"])
            | Q(created_at=last["created_at"], id__gt=last["id"])
        )
    with transaction.atomic():
        partitions.lock(month)
        dropped = partitions.rows_in(month) == written
        if dropped:
            partitions.drop(month)
    if not dropped:
        # A row arrived after the read (a clock far behind): delete what was written, keep it.
        log.warning("event partition %s changed while archived: deleting by id", month.name)
        for pending in pendings:
            result.archived += _finish(pending)
    else:
        result.archived += written
        for pending in pendings:
            _publish(pending)
    result.files.extend(pending.name.removesuffix(PENDING) for pending in pendings)
    log.info("event partition %s archived (%d rows) and dropped: %s", month.name, written, dropped)


def archive_read(path: Path) -> Iterator[dict[str, Any]]:
    """The events of one archive file, as written."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One run at a time per directory (beat and a manual command may overlap)."""
    with open(directory / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveBusy(f"another run is archiving events into {directory}") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_pending(directory: Path, events: list[dict[str, Any]]) -> Path:
    first, last = events[0], events[-1]
    name = f"events-{first['created_at']:%Y%m%d}-{first['id']:012d}-{last['id']:012d}{SUFFIX}"
    if (directory / name).exists():
        # The rows of a finished archive are gone; meeting its name again means the table
        # and the directory disagree. Overwriting would lose the first file's events.
        raise FileExistsError(f"{directory / name} exists already")
    temp = directory / f"{name}{TEMP}"
    with open(temp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped:
            for event in events:
                line = json.dumps({**event, "created_at": event["created_at"].isoformat()})
                zipped.write(line.encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    pending = directory / f"{name}{PENDING}"
    os.replace(temp, pending)
    _fsync_dir(directory)
    return pending


def _finish(pending: Path) -> int:
    """Delete the rows a pending archive holds, then mark the archive finished."""
    ids = [int(event["id"]) for event in archive_read(pending)]
    deleted = _delete_rows(ids)
    _publish(pending)
    return deleted


def _delete_rows(ids: list[int]) -> int:
    deleted = 0
    with transaction.atomic():
        for start in range(0, len(ids), DELETE_CHUNK):
            deleted += Event.objects.delete_archived(ids[start : start + DELETE_CHUNK])
    return deleted


def _publish(pending: Path) -> None:
    os.replace(pending, pending.with_name(pending.name.removesuffix(PENDING)))
    _fsync_dir(pending.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
