"""Reports of one node arrive out of order (progress, final reports and heartbeats travel on
different queues and workers): an overtaken report still counts once, a replay never does,
a late snapshot never puts back what the node no longer is."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Fleet
from tests.factories import make_release
from tests.security.signing import signed_report
from updates.engine.reports import ReportSequence, ReportType
from updates.fleet import reports
from updates.fleet import tasks as fleet_tasks
from updates.fleet.reports import REPORT_WINDOW, window_after
from updates.models import Node, ReportRejection, UpdateJob

HB, PROGRESS, FINISHED = ReportType.HEARTBEAT, ReportType.JOB_PROGRESS, ReportType.JOB_FINISHED


def _replayed() -> int:
    row = ReportRejection.objects.filter(source="a-1", reason="replayed").first()
    return row.count if row is not None else 0


def _progress(job: UpdateJob, done: int, seq: int, step: str = "DOWNLOADING") -> None:
    report: dict[str, Any] = {"job_id": str(job.pk), "step": step, "percent": 2 + done // 10}
    if step == "DOWNLOADING":
        report.update(bytes_done=done, bytes_total=100)
    fleet_tasks.job_progress(envelope=signed_report("a-1", PROGRESS, report, seq=seq))


def test_window_after_accepts_each_number_once_within_the_window() -> None:
    """Against an oracle: the set of numbers accepted so far."""
    rng = random.Random(7)
    highest, window, seen = 0, 0, set()
    for _ in range(5_000):
        seq = max(1, highest + rng.randint(-80, 5))
        after = window_after(highest, window, seq)
        fresh = seq not in seen and seq > highest - REPORT_WINDOW - 1
        assert (after is not None) == fresh, (highest, seq)
        if after is not None:
            highest, window = after
            seen.add(seq)
            assert 0 <= window < 1 << 63  # fits the signed 64-bit column


def test_window_edges() -> None:
    assert window_after(100, 1, 100 - REPORT_WINDOW) == (100, 1 | 1 << REPORT_WINDOW)
    assert window_after(100, 1, 99 - REPORT_WINDOW) is None
    assert window_after(100, 1, 100) is None
    # A jump past the whole window forgets it: only the new highest is marked.
    assert window_after(100, 0b111, 100 + REPORT_WINDOW + 1) == (100 + REPORT_WINDOW + 1, 1)
    assert window_after(100, 0b1, 101) == (101, 0b11)


@pytest.mark.django_db
def test_an_overtaken_progress_report_counts_but_moves_nothing_back(fleet: Fleet) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    _progress(job, 100, seq=11)
    _progress(job, 0, seq=10)  # sent first, arrived second
    job.refresh_from_db()
    assert (job.state, job.bytes_done, job.progress_sequence) == ("DOWNLOADING", 100, 11)
    assert _replayed() == 0
    assert Node.objects.get(node_id="a-1").report_sequence == 11
    _progress(job, 0, seq=10)  # the same report again: a replay
    assert _replayed() == 1
    _progress(job, 100, seq=12, step="STAGED")
    _progress(job, 50, seq=9)  # an older download report: the state does not go back
    job.refresh_from_db()
    assert (job.state, job.progress_sequence) == ("VERIFYING", 12)


@pytest.mark.django_db
def test_a_download_report_overtaken_by_a_later_step_still_gives_the_bytes(
    fleet: Fleet,
) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    _progress(job, 40, seq=40)
    _progress(job, 100, seq=43, step="STAGED")
    _progress(job, 100, seq=42)  # the download's last report, overtaken by the next step's
    _progress(job, 70, seq=41)  # an earlier one still: the figures do not go back
    job.refresh_from_db()
    assert (job.state, job.bytes_done, job.bytes_total, job.bytes_sequence) == (
        "VERIFYING",
        100,
        100,
        42,
    )
    assert job.progress_sequence == 43
    assert _replayed() == 0


@pytest.mark.django_db
def test_a_download_report_overtaken_by_the_final_report_still_gives_the_bytes(
    fleet: Fleet,
) -> None:
    job = UpdateJob.objects.create(
        node=fleet.node_a, release=make_release(version="1.7.0"), state=UpdateJob.State.VERIFYING
    )
    final = {"job_id": str(job.pk), "ok": True, "result": {"version_to": "1.7.0"}}
    fleet_tasks.job_finished(envelope=signed_report("a-1", FINISHED, final, seq=52))
    _progress(job, 100, seq=51)
    job.refresh_from_db()
    # The figures count; the job stays as its final report left it.
    assert (job.state, job.progress_percent, job.bytes_done, job.bytes_total) == (
        "DONE",
        100,
        100,
        100,
    )


@pytest.mark.django_db
def test_a_final_report_overtaken_by_a_heartbeat_still_closes_the_job(fleet: Fleet) -> None:
    job = UpdateJob.objects.create(
        node=fleet.node_a, release=make_release(version="1.7.0"), state=UpdateJob.State.VERIFYING
    )
    fleet_tasks.record_heartbeat(
        envelope=signed_report("a-1", HB, {"installed_version": "1.7.0"}, seq=21)
    )
    final = {"job_id": str(job.pk), "ok": True, "result": {"version_to": "1.7.0"}}
    fleet_tasks.job_finished(envelope=signed_report("a-1", FINISHED, final, seq=20))
    job.refresh_from_db()
    assert job.state == UpdateJob.State.DONE
    assert _replayed() == 0


@pytest.mark.django_db
def test_job_reports_numbered_by_an_agent_still_count_after_a_later_heartbeat(
    fleet: Fleet, tmp_path: Path
) -> None:
    """As an agent numbers them (its ReportSequence), with time between: the progress
    reports wait on the job queue while the heartbeat sent after them is stored first."""
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    numbers = ReportSequence(tmp_path / "seq.json")
    waiting = []
    for _ in range(2):
        waiting.append(numbers.next())
        time.sleep(0.01)
    fleet_tasks.record_heartbeat(
        envelope=signed_report("a-1", HB, {"installed_version": "1.6.0"}, seq=numbers.next())
    )
    for done, seq in zip((40, 100), waiting, strict=True):
        _progress(job, done, seq=seq)
    job.refresh_from_db()
    assert (job.state, job.bytes_done) == ("DOWNLOADING", 100)
    assert _replayed() == 0


@pytest.mark.django_db
def test_a_heartbeat_overtaken_by_a_later_report_is_refused(fleet: Fleet) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    fleet_tasks.record_heartbeat(
        envelope=signed_report("a-1", HB, {"installed_version": "1.6.0"}, seq=30)
    )
    _progress(job, 10, seq=32)
    late = {"installed_version": "1.5.0", "service_healthy": False}
    fleet_tasks.record_heartbeat(envelope=signed_report("a-1", HB, late, seq=31))
    node = Node.objects.get(node_id="a-1")
    assert (node.installed_version, node.service_healthy) == ("1.6.0", None)
    assert _replayed() == 1


@pytest.mark.django_db
def test_a_report_older_than_the_window_is_refused(fleet: Fleet) -> None:
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    _progress(job, 50, seq=200)
    _progress(job, 60, seq=200 - REPORT_WINDOW - 1)
    assert _replayed() == 1
    _progress(job, 60, seq=200 - REPORT_WINDOW)  # the oldest the window still holds
    assert _replayed() == 1
    job.refresh_from_db()
    assert job.bytes_done == 50  # accepted, yet older than the figures shown


@pytest.mark.django_db
def test_a_claim_from_a_row_read_before_another_report_reads_it_again(fleet: Fleet) -> None:
    stale = Node.objects.get(node_id="a-1")  # read before the next report is taken
    job = UpdateJob.objects.create(node=fleet.node_a, release=make_release(version="1.7.0"))
    _progress(job, 10, seq=40)
    reports.claim_sequence(stale, 39, newest_only=False)
    node = Node.objects.get(node_id="a-1")
    assert (node.report_sequence, node.report_window) == (40, 0b11)
    with pytest.raises(reports.ReportRefused):
        reports.claim_sequence(stale, 40, newest_only=False)  # seen, though not in `stale`
