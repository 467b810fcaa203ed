"""PostgreSQL's event table partitioned by month: the migration, the partitions created ahead,
rows of a month with no partition yet, and retention dropping a month whole. Run by the
PostgreSQL pass of `make test` (tests/project/test_postgres_suite.py); on SQLite there is one
plain table, which the last tests check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from pytest_django.fixtures import Settings

from tests.conftest import Fleet
from updates.audit import event_log
from updates.events import partitions
from updates.events.partitions import MonthPartition
from updates.events.services import archive_read, events_archive
from updates.events.tasks import archive_events
from updates.models import Event

pytestmark = pytest.mark.django_db
on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL only: run by the PostgreSQL pass"
)

NOW = datetime(2026, 6, 10, 12, tzinfo=UTC)


class Killed(Exception):
    """Stands for the process dying at this line."""


def _events_on(days_ago: list[int], fleet: Fleet) -> dict[int, datetime]:
    """One event on each of these days before NOW: id -> created_at."""
    made = {}
    for days in days_ago:
        with time_machine.travel(NOW - timedelta(days=days), tick=False):
            event = event_log(verb="test.partition", tenant=fleet.tenant_a, details={"d": days})
        made[event.id] = event.created_at
    return made


def _partition_of(event_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tableoid::regclass::text FROM updates_event WHERE id = %s", [event_id]
        )
        row = cursor.fetchone()
    assert row is not None
    return str(row[0])


def _archived_ids(directory: Path) -> list[int]:
    return [
        int(str(event["id"]))
        for path in sorted(directory.glob("*.jsonl.gz"))
        for event in archive_read(path)
    ]


def test_month_partitions_cover_first_of_month_to_first_of_next() -> None:
    december = MonthPartition.of(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert december.name == "updates_event_y2026m12"
    assert december.start == datetime(2026, 12, 1, tzinfo=UTC)
    assert december.end == datetime(2027, 1, 1, tzinfo=UTC)
    assert MonthPartition.of(december.end).name == "updates_event_y2027m01"


@pytest.mark.skipif(connection.vendor == "postgresql", reason="SQLite: one plain table")
def test_on_sqlite_there_is_nothing_to_partition(fleet: Fleet, tmp_path: Path) -> None:
    assert partitions.partitioned() is False
    assert partitions.ensure_event_partitions(now=NOW) == []
    assert partitions.months_before(NOW) == []
    made = _events_on([200, 1], fleet)
    result = events_archive(keep_days=90, directory=tmp_path, now=NOW)
    assert result.archived == 1
    assert set(Event.objects.values_list("id", flat=True)) & set(made) == {max(made)}


@on_postgresql
def test_the_table_is_partitioned_with_its_indexes_and_a_composite_key() -> None:
    assert partitions.partitioned()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'updates_event' ORDER BY 1"
        )
        names = {row[0] for row in cursor.fetchall()}
        cursor.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'updates_event'::regclass AND contype = 'p'"
        )
        primary_key = cursor.fetchone()
        cursor.execute("SELECT pg_get_serial_sequence('updates_event', 'id')")
        sequence = cursor.fetchone()
    assert {index.name for index in Event._meta.indexes} <= names
    assert primary_key == ("PRIMARY KEY (id, created_at)",)
    assert sequence is not None and sequence[0] is not None
    # The months around now exist (the migration made them), and the default partition.
    now = datetime.now(UTC)
    assert MonthPartition.of(now) in partitions.month_partitions()


@on_postgresql
def test_rows_land_in_their_month_and_a_missing_month_is_moved_out_of_default(
    fleet: Fleet,
) -> None:
    made = _events_on([400, 1], fleet)
    old_id, new_id = sorted(made)
    assert _partition_of(old_id) == partitions.DEFAULT_PARTITION
    created = partitions.ensure_event_partitions(now=NOW, first=made[old_id])
    old_month = MonthPartition.of(made[old_id])
    assert old_month.name in created and MonthPartition.of(NOW).name in created
    assert _partition_of(old_id) == old_month.name
    assert _partition_of(new_id) == MonthPartition.of(made[new_id]).name
    # Repeating creates nothing and moves nothing.
    assert partitions.ensure_event_partitions(now=NOW, first=made[old_id]) == []
    assert Event.objects.filter(id__in=made).count() == 2
    # Ahead of NOW: three more months.
    months = partitions.month_partitions()
    assert MonthPartition.of(datetime(2026, 9, 1, tzinfo=UTC)) in months


@on_postgresql
def test_retention_drops_a_month_past_it_whole_and_deletes_the_rest_by_id(
    fleet: Fleet, tmp_path: Path
) -> None:
    made = _events_on([150, 149, 120, 95, 10], fleet)
    partitions.ensure_event_partitions(now=NOW, first=min(made.values()))
    cutoff = NOW - timedelta(days=90)
    january = MonthPartition.of(NOW - timedelta(days=150))
    assert january in partitions.months_before(cutoff)

    result = events_archive(keep_days=90, directory=tmp_path, now=NOW, batch_size=1)

    old = {i for i, at in made.items() if at < cutoff}
    assert result.archived == len(old) == 4
    assert sorted(_archived_ids(tmp_path)) == sorted(old)
    assert set(Event.objects.filter(verb="test.partition").values_list("id", flat=True)) == (
        set(made) - old
    )
    # Whole months past retention are gone from the catalogue, the cutoff's month stays.
    assert partitions.months_before(cutoff) == []
    assert MonthPartition.of(cutoff) in partitions.month_partitions()
    assert not list(tmp_path.glob("*.pending")) and not list(tmp_path.glob("*.tmp"))


@on_postgresql
def test_a_run_killed_before_the_drop_is_finished_by_the_next_without_loss_or_repeat(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _events_on([150, 149, 148, 10], fleet)
    partitions.ensure_event_partitions(now=NOW, first=min(made.values()))
    old = {i for i, at in made.items() if at < NOW - timedelta(days=90)}

    def killed(month: MonthPartition) -> None:
        raise Killed

    monkeypatch.setattr(partitions, "drop", killed)
    with pytest.raises(Killed):
        events_archive(keep_days=90, directory=tmp_path, now=NOW, batch_size=2)
    # Written out but not dropped: every old row still in the table, the files still pending.
    assert len(list(tmp_path.glob("*.pending"))) == 2
    assert not list(tmp_path.glob("*.jsonl.gz"))
    assert set(Event.objects.filter(id__in=made).values_list("id", flat=True)) == set(made)

    monkeypatch.undo()
    result = events_archive(keep_days=90, directory=tmp_path, now=NOW, batch_size=2)
    assert result.resumed == 2 and result.archived == 3
    assert sorted(_archived_ids(tmp_path)) == sorted(old)
    assert set(Event.objects.filter(id__in=made).values_list("id", flat=True)) == set(made) - old
    assert not list(tmp_path.glob("*.pending"))


@on_postgresql
def test_a_month_that_changed_while_written_out_is_deleted_by_id_not_dropped(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _events_on([150, 149], fleet)
    partitions.ensure_event_partitions(now=NOW, first=min(made.values()))
    january = MonthPartition.of(NOW - timedelta(days=150))
    counted = partitions.rows_in

    def one_more(month: MonthPartition) -> int:
        return counted(month) + 1  # as if a row had arrived after the read

    monkeypatch.setattr(partitions, "rows_in", one_more)
    result = events_archive(keep_days=90, directory=tmp_path, now=NOW)
    assert result.archived == 2
    assert sorted(_archived_ids(tmp_path)) == sorted(made)
    assert not Event.objects.filter(id__in=made).exists()
    assert january in partitions.month_partitions()  # kept: only its archived rows left


@on_postgresql
def test_the_beat_task_creates_the_coming_months(settings: Settings, tmp_path: Path) -> None:
    coming = MonthPartition.of(datetime.now(UTC))
    for _ in range(partitions.MONTHS_AHEAD):
        coming = MonthPartition.of(coming.end)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE updates_event DETACH PARTITION {coming.name}")
        cursor.execute(f"DROP TABLE {coming.name}")
    assert coming not in partitions.month_partitions()
    settings.THEMIS_EVENTS_ARCHIVE_DIR = tmp_path
    archive_events()
    assert coming in partitions.month_partitions()


@on_postgresql
def test_a_newest_first_page_reads_partitions_by_index_without_a_sort(fleet: Fleet) -> None:
    _events_on([40, 20, 1], fleet)
    with connection.cursor() as cursor:
        # A tiny table: the planner would rightly sort a few rows. Forbidding sorts, bitmap and
        # sequential scans asks whether a plan without them exists (if not, it sorts anyway).
        for setting in ("enable_seqscan", "enable_sort", "enable_bitmapscan"):
            cursor.execute(f"SET LOCAL {setting} = off")
        cursor.execute(
            "EXPLAIN SELECT id FROM updates_event WHERE tenant_id = %s "
            "ORDER BY created_at DESC, id DESC LIMIT 51",
            [fleet.tenant_a.id],
        )
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "event_tenant_created" in plan or "tenant_id_created_at_id" in plan, plan
    assert "Sort  (" not in plan, plan
    assert plan.count("tenant_id_created_at_id_idx") == len(partitions.month_partitions()) + 1, plan


@pytest.mark.django_db(transaction=True)
@on_postgresql
def test_the_migration_converts_both_ways_keeping_every_row(fleet: Fleet) -> None:
    made = _events_on([30, 2], fleet)
    executor = MigrationExecutor(connection)
    executor.migrate([("updates", "0020_node_fleet_page_indexes")])
    assert not partitions.partitioned()
    assert set(Event.objects.filter(id__in=made).values_list("id", flat=True)) == set(made)
    # Forward to the newest migrations of every app (those after 0021 were undone with it):
    # the tests after this one need the whole schema.
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert partitions.partitioned()
    assert set(Event.objects.filter(id__in=made).values_list("id", flat=True)) == set(made)
    newer = event_log(verb="test.partition", details={})
    assert newer.id > max(made)
