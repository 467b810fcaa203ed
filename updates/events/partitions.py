"""Monthly partitions of the audit log on PostgreSQL (migration 0021 makes `updates_event` a table
partitioned by range of `created_at`; SQLite keeps one plain table and every function here is a
no-op there).

Why: retention then drops a whole month (`DETACH PARTITION` + `DROP TABLE`, a catalogue change)
instead of deleting it row by row, and each month's indexes stay small to vacuum.

- A partition is named after its month, `updates_event_y2026m12`, and holds
  [first of the month, first of the next) in UTC.
- `updates_event_default` takes a row no month partition holds (a clock far off, a month not
  created yet). Creating that month's partition later moves those rows into it, in the same
  transaction, so no row is ever in two places or none.
- The primary key is (id, created_at), as PostgreSQL requires of a partitioned table; `id` stays
  unique because one sequence numbers every row, and nothing updates an event.

Table names in the SQL below are made here from a year and a month, never from input.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

log = logging.getLogger(__name__)

PARENT = "updates_event"
DEFAULT_PARTITION = "updates_event_default"
# Months created ahead of the current one: the beat runs hourly, so three months is a wide margin.
MONTHS_AHEAD = 3
_MONTH_NAME = re.compile(r"^updates_event_y(\d{4})m(\d{2})$")


@dataclass(frozen=True, order=True)
class MonthPartition:
    start: datetime  # first instant it holds (UTC)
    end: datetime  # first instant it no longer holds

    @property
    def name(self) -> str:
        return f"{PARENT}_y{self.start:%Y}m{self.start:%m}"

    @classmethod
    def of(cls, moment: datetime | date) -> MonthPartition:
        start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        return cls(start=start, end=_next_month(start))


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def partitioned() -> bool:
    """Whether the event table is partitioned (PostgreSQL after migration 0021)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
            "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
            [PARENT],
        )
        return cursor.fetchone() is not None


def month_partitions() -> list[MonthPartition]:
    """The month partitions that exist, oldest first (the default partition is not one)."""
    return _listed_months() if partitioned() else []


def _listed_months() -> list[MonthPartition]:
    """The month partitions of a table known to be partitioned."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [PARENT],
        )
        names = [row[0] for row in cursor.fetchall()]
    months = []
    for name in names:
        match = _MONTH_NAME.match(name)
        if match:
            months.append(MonthPartition.of(date(int(match[1]), int(match[2]), 1)))
    return sorted(months)


def ensure_event_partitions(
    *, now: datetime | None = None, first: datetime | None = None, ahead: int = MONTHS_AHEAD
) -> list[str]:
    """Create the month partitions from `first`'s month (default: now's) to `ahead` months after
    now's, those missing only; the names created. Safe to repeat and to run concurrently (a
    creation that loses the race is rolled back alone)."""
    if not partitioned():
        return []
    now = now or timezone.now()
    wanted = MonthPartition.of(first or now)
    last = MonthPartition.of(now)
    for _ in range(ahead):
        last = MonthPartition.of(last.end)
    existing = set(_listed_months())
    created = []
    while wanted <= last:
        if wanted not in existing and _create_month(wanted):
            created.append(wanted.name)
        wanted = MonthPartition.of(wanted.end)
    if created:
        log.info("created event partitions %s", ", ".join(created))
    return created


def _create_month(month: MonthPartition) -> bool:
    """Create one month's partition, moving into it the rows the default partition holds for it
    (PostgreSQL refuses to attach a range the default partition has rows of)."""
    bounds = f"FROM ('{month.start.isoformat()}') TO ('{month.end.isoformat()}')"
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TABLE {month.name} "
                f"(LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            cursor.execute(
                f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "  # noqa: S608 - names made here
                "WHERE created_at >= %s AND created_at < %s RETURNING *) "
                f"INSERT INTO {month.name} SELECT * FROM moved",
                [month.start, month.end],
            )
            cursor.execute(
                f"ALTER TABLE {PARENT} ATTACH PARTITION {month.name} FOR VALUES {bounds}"
            )
    except DatabaseError as error:
        # Another process may have created it first: that is the one failure that is no failure.
        if month in set(_listed_months()):
            return False
        raise RuntimeError(f"could not create event partition {month.name}: {error}") from error
    return True


def months_before(cutoff: datetime) -> list[MonthPartition]:
    """The month partitions every row of which is older than `cutoff`, oldest first."""
    return [month for month in month_partitions() if month.end <= cutoff]


def rows_in(month: MonthPartition) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {month.name}")  # noqa: S608 - a name made here
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def lock(month: MonthPartition) -> None:
    """Hold the partition against every reader and writer until the transaction ends (only
    retention's own drop of a month entirely past retention waits on it)."""
    with connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {month.name} IN ACCESS EXCLUSIVE MODE")


def drop(month: MonthPartition) -> None:
    """Detach and drop one month partition, inside the caller's transaction."""
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {PARENT} DETACH PARTITION {month.name}")
        cursor.execute(f"DROP TABLE {month.name}")
