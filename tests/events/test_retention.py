"""Retention: old events go to gzip'd JSON-lines files, then leave the table; a run killed at
any step is finished by the next without losing or repeating an event."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from django.conf import settings
from django.core.management import CommandError, call_command
from pytest_django.fixtures import Settings

from tests.conftest import Fleet
from updates.audit import event_log
from updates.events import services
from updates.events.services import ArchiveBusy, archive_read, events_archive
from updates.events.tasks import archive_events
from updates.models import AppendOnlyError, Event

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


class Killed(Exception):
    """Stands for the process dying at this line."""


@pytest.fixture
def history(fleet: Fleet) -> dict[str, set[int]]:
    """25 events a day for the 100 days before NOW: the ids older than 90 days, and the rest."""
    for day in range(100, 0, -1):
        with time_machine.travel(NOW - timedelta(days=day, hours=-1), tick=False):
            for i in range(25):
                event_log(
                    verb="test.old",
                    tenant=fleet.tenant_a,
                    obj=fleet.node_a,
                    details={"day": day, "i": i, "text": "é\\u00e9"},
                )
    cutoff = NOW - timedelta(days=90)
    return {
        "old": set(Event.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)),
        "kept": set(Event.objects.filter(created_at__gte=cutoff).values_list("id", flat=True)),
    }


def _archived(directory: Path) -> list[dict[str, object]]:
    return [event for path in sorted(directory.glob("*.jsonl.gz")) for event in archive_read(path)]


def _run(directory: Path, batch_size: int = 40) -> services.ArchiveResult:
    return events_archive(keep_days=90, directory=directory, now=NOW, batch_size=batch_size)


def _assert_archived_exactly_once(directory: Path, history: dict[str, set[int]]) -> None:
    ids = [int(str(event["id"])) for event in _archived(directory)]
    assert len(ids) == len(set(ids)) == len(history["old"]) == 250
    assert set(ids) == history["old"]
    left = set(Event.objects.exclude(verb="events.archived").values_list("id", flat=True))
    assert left == history["kept"]
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".jsonl.gz")) == [
        ".lock"
    ]


def test_old_events_are_written_then_deleted(tmp_path: Path, history: dict[str, set[int]]) -> None:
    result = _run(tmp_path)
    assert result.archived == 250 and len(result.files) == 7  # 40 a batch
    _assert_archived_exactly_once(tmp_path, history)
    first = next(iter(_archived(tmp_path)))
    original = min(history["old"])
    assert first["id"] == original and first["verb"] == "test.old"
    assert first["details"] == {"day": 100, "i": 0, "text": "é\\u00e9"}
    assert first["object_type"] == "node" and first["actor_label"] == "system"
    assert datetime.fromisoformat(str(first["created_at"])) == NOW - timedelta(days=100, hours=-1)
    # Each file is a gzip'd JSON line per event, named after its first day and ids.
    path = sorted(tmp_path.glob("*.jsonl.gz"))[0]
    day = f"{NOW - timedelta(days=100):%Y%m%d}"
    assert path.name == f"events-{day}-{original:012d}-{original + 39:012d}.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        assert len([json.loads(line) for line in lines]) == 40
    audit = Event.objects.get(verb="events.archived")
    assert audit.details["count"] == 250 and audit.details["files"] == 7
    assert audit.details["directory"] == str(tmp_path) and audit.details["keep_days"] == 90
    # A second run finds nothing due and says nothing.
    assert _run(tmp_path).archived == 0
    assert Event.objects.filter(verb="events.archived").count() == 1


def test_keep_days_zero_keeps_everything(tmp_path: Path, history: dict[str, set[int]]) -> None:
    result = events_archive(keep_days=0, directory=tmp_path / "archive", now=NOW)
    assert result.archived == 0 and result.cutoff is None
    assert not (tmp_path / "archive").exists()
    assert Event.objects.count() == 2500


def test_killed_between_export_and_delete(
    tmp_path: Path, history: dict[str, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def dies_on_third(ids: list[int]) -> int:
        calls.append(ids)
        if len(calls) == 3:
            raise Killed
        return real_delete(ids)

    real_delete = services._delete_rows
    monkeypatch.setattr(services, "_delete_rows", dies_on_third)
    with pytest.raises(Killed):
        _run(tmp_path)
    # Two batches finished; the third is on disk, complete, and its rows still in the table.
    [pending] = tmp_path.glob("*.pending")
    in_pending = {int(str(e["id"])) for e in archive_read(pending)}
    assert in_pending == set(calls[2]) and len(in_pending) == 40
    assert Event.objects.filter(pk__in=in_pending).count() == 40
    assert len(list(tmp_path.glob("*.jsonl.gz"))) == 2
    assert Event.objects.count() == 2500 - 80
    monkeypatch.setattr(services, "_delete_rows", real_delete)
    result = _run(tmp_path, batch_size=100)  # another batch size changes nothing
    assert result.resumed == 1 and result.archived == 250 - 80
    _assert_archived_exactly_once(tmp_path, history)


def test_killed_after_delete_before_the_file_is_marked_done(
    tmp_path: Path, history: dict[str, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(pending: Path) -> None:
        raise Killed

    monkeypatch.setattr(services, "_publish", dies)
    with pytest.raises(Killed):
        _run(tmp_path)
    [pending] = tmp_path.glob("*.pending")
    gone = {int(str(e["id"])) for e in archive_read(pending)}
    assert not Event.objects.filter(pk__in=gone).exists()  # deleted, only in the file now
    monkeypatch.undo()
    assert _run(tmp_path).resumed == 1
    _assert_archived_exactly_once(tmp_path, history)


def test_killed_while_writing_leaves_a_temp_file_the_next_run_removes(
    tmp_path: Path, history: dict[str, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def dies(fd: int) -> None:
        raise Killed

    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(Killed):
        _run(tmp_path)
    [temp] = tmp_path.glob("*.tmp")
    assert temp.stat().st_size > 0
    assert not list(tmp_path.glob("*.jsonl.gz")) and not list(tmp_path.glob("*.pending"))
    assert Event.objects.count() == 2500
    monkeypatch.setattr(os, "fsync", real_fsync)
    _run(tmp_path)
    assert not temp.exists()
    _assert_archived_exactly_once(tmp_path, history)


def test_an_existing_archive_is_never_overwritten(
    tmp_path: Path, history: dict[str, set[int]]
) -> None:
    first = min(history["old"])
    name = f"events-{NOW - timedelta(days=100):%Y%m%d}-{first:012d}-{first + 39:012d}.jsonl.gz"
    (tmp_path / name).write_bytes(b"someone's archive")
    with pytest.raises(FileExistsError):
        _run(tmp_path)
    assert (tmp_path / name).read_bytes() == b"someone's archive"
    assert Event.objects.count() == 2500


def test_one_run_at_a_time(
    tmp_path: Path, history: dict[str, set[int]], settings: Settings
) -> None:
    settings.THEMIS_EVENTS_ARCHIVE_DIR = tmp_path
    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ArchiveBusy):
            _run(tmp_path)
        with pytest.raises(CommandError, match="another run"):
            call_command("archive_events", directory=tmp_path)
        with time_machine.travel(NOW, tick=False):
            assert archive_events() == 0  # the next beat carries on
    assert Event.objects.count() == 2500


def test_events_leave_only_through_retention(history: dict[str, set[int]]) -> None:
    with pytest.raises(AppendOnlyError):
        Event.objects.filter(pk__in=history["old"]).delete()
    assert Event.objects.count() == 2500


def test_command_and_beat_task_use_the_settings(
    tmp_path: Path, history: dict[str, set[int]], settings: Settings
) -> None:
    settings.THEMIS_EVENTS_ARCHIVE_DIR = tmp_path / "beat"
    settings.THEMIS_EVENTS_KEEP_DAYS = 95
    with time_machine.travel(NOW, tick=False):
        assert archive_events() == 125  # days 100..96
        out = StringIO()
        call_command("archive_events", keep_days=90, directory=tmp_path / "cli", stdout=out)
    assert "archived 125 events" in out.getvalue() and str(tmp_path / "cli") in out.getvalue()
    ids = [int(str(e["id"])) for d in ("beat", "cli") for e in _archived(tmp_path / d)]
    assert sorted(ids) == sorted(history["old"])
    assert Event.objects.filter(verb="events.archived").count() == 2


def test_retention_defaults() -> None:
    assert settings.THEMIS_EVENTS_KEEP_DAYS == 90
    assert settings.THEMIS_EVENTS_ARCHIVE_DIR == settings.VAR_DIR / "events-archive"
    entry = settings.CELERY_BEAT_SCHEDULE["archive-old-events"]
    assert entry["task"] == "workers.tasks.archive_events"
    assert entry["schedule"] == float(settings.THEMIS_EVENTS_ARCHIVE_SECONDS)
