"""Job deadlines: the reaper ends jobs LOST when never acknowledged, silent, or on an
offline node; a LOST job frees its node and a late report changes nothing. Clocks are
passed in; a recording transport stands in for the agents."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings

from tenants.gate import GateDecision
from tests.conftest import Fleet
from tests.factories import make_release
from tests.jobs.test_outbox import RecordingTransport
from updates.fleet.services import Heartbeat, node_record_heartbeat, nodes_mark_offline
from updates.jobs import deadlines, outbox
from updates.jobs import services as jobs
from updates.models import Event, Node, NodeCommand, Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db

S = UpdateJob.State
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.get_fixed_timezone(0))


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture(autouse=True)
def short_deadlines(settings: Settings) -> None:
    settings.THEMIS_JOB_ACK_TIMEOUT = 30
    settings.THEMIS_JOB_MAX_SENDS = 3
    settings.THEMIS_JOB_PROGRESS_TIMEOUT = 600
    settings.THEMIS_JOB_OFFLINE_GRACE = 120
    settings.THEMIS_NODE_OFFLINE_AFTER = 30


def _running_job(fleet: Fleet, release: Release, transport: RecordingTransport) -> UpdateJob:
    Node.objects.filter(pk=fleet.node_a.pk).update(status=Node.Status.ONLINE, last_heartbeat=T0)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="ACCEPTED", percent=1, now=T0)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING", now=T0)
    return job


# Scenario 1: a job whose node goes offline ends LOST within its deadline, and the node
# can take a new job.
def test_job_on_a_node_gone_offline_ends_lost_and_frees_the_node(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = _running_job(fleet, release, transport)
    # the node falls silent: marked offline after 30 s
    assert "a-1" in nodes_mark_offline(silence_seconds=30, now=T0 + timedelta(seconds=31))
    # within the grace it is not ended yet
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=30 + 119)) == deadlines.ReapResult()
    job.refresh_from_db()
    assert job.state == S.DOWNLOADING
    result = deadlines.jobs_reap(now=T0 + timedelta(seconds=30 + 121))
    assert result.node_offline == (job.pk,)
    job.refresh_from_db()
    assert (job.state, job.error_code) == (S.LOST, "LOST")
    assert job.error_message == "node offline for more than 120 s"
    assert job.finished_at is not None
    assert Event.objects.filter(verb="job.lost", object_id=str(job.pk)).count() == 1
    # a second pass changes nothing
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=400)) == deadlines.ReapResult()
    assert Event.objects.filter(verb="job.lost").count() == 1
    # the node is free for a new job
    fleet.node_a.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        again = jobs.job_start_update(
            node=fleet.node_a, release=release, user=None, transport=transport
        )
    assert again.state == S.QUEUED
    assert NodeCommand.objects.get(job=again).state == NodeCommand.State.SENT


# Scenario 1: a job whose message is lost ends LOST once its sends are used up.
def test_job_whose_message_is_lost_ends_lost_after_its_sends(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(status=Node.Status.ONLINE, last_heartbeat=T0)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    NodeCommand.objects.filter(job=job).update(next_attempt_at=T0)
    now = T0
    # every message vanishes (e.g. the broker restarted without persistence)
    for _ in range(4):
        with django_capture_on_commit_callbacks(execute=False):
            outbox.relay_due(transport=transport, now=now)
        now += timedelta(seconds=30)
    job.refresh_from_db()
    assert (job.state, job.error_message) == (S.LOST, "not acknowledged after 3 sends")
    assert len(transport.sent) == 3
    assert NodeCommand.objects.get(job=job).state == NodeCommand.State.ABANDONED
    assert not UpdateJob.objects.filter(node=fleet.node_a, state__in=UpdateJob.ACTIVE_STATES)


def test_silent_acknowledged_job_ends_lost_after_progress_timeout(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _running_job(fleet, release, transport)
    # heartbeats keep the node online; a heartbeat naming the job keeps the job alive
    at = T0 + timedelta(seconds=500)
    node_record_heartbeat(
        heartbeat=Heartbeat.from_payload({"node_id": "a-1", "active_job_id": str(job.pk)}),
        now=at,
    )
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=700)) == deadlines.ReapResult()
    node_record_heartbeat(heartbeat=Heartbeat.from_payload({"node_id": "a-1"}), now=at)
    result = deadlines.jobs_reap(now=at + timedelta(seconds=601))
    assert result.no_progress == (job.pk,)
    job.refresh_from_db()
    assert (job.state, job.error_message) == (S.LOST, "no progress for 600 s")


def test_rollout_options_set_the_deadlines(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    rollout = Rollout.objects.create(
        release=release, strategy=Rollout.Strategy.ROLLING, options={"progress_timeout": 60}
    )
    job = _running_job(fleet, release, transport)
    UpdateJob.objects.filter(pk=job.pk).update(rollout=rollout)
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=61)).no_progress == (job.pk,)
    assert UpdateJob.objects.get(pk=job.pk).error_message == "no progress for 60 s"


def test_unacknowledged_job_with_abandoned_commands_is_reaped(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(status=Node.Status.ONLINE, last_heartbeat=T0)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None, transport=transport)
    NodeCommand.objects.filter(job=job).update(
        state=NodeCommand.State.ABANDONED, attempts=3, last_sent_at=T0
    )
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=29)) == deadlines.ReapResult()
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=31)).not_acknowledged == (job.pk,)


def test_waiting_jobs_have_no_deadline(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    Node.objects.filter(pk=fleet.node_a.pk).update(status=Node.Status.OFFLINE, last_heartbeat=T0)
    job = jobs.job_start_update(
        node=fleet.node_a,
        release=release,
        user=None,
        transport=transport,
        gate=_hold,
    )
    assert job.state == S.WAITING_FOR_WINDOW
    assert deadlines.jobs_reap(now=T0 + timedelta(days=3)) == deadlines.ReapResult()


def _hold(*, node: Node, release: Release | None, at: datetime | None = None) -> GateDecision:
    return GateDecision(
        allowed=False, wait_state=S.WAITING_FOR_WINDOW, reason="outside the maintenance window"
    )


def test_late_report_for_a_lost_job_changes_nothing_but_is_logged(
    fleet: Fleet, release: Release, transport: RecordingTransport
) -> None:
    job = _running_job(fleet, release, transport)
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=601)).no_progress == (job.pk,)
    final = jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    assert final is None
    job.refresh_from_db()
    assert job.state == S.LOST
    assert not jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="VERIFYING")
    job.refresh_from_db()
    assert job.state == S.LOST
    late = Event.objects.filter(verb="job.late_report", object_id=str(job.pk))
    assert late.count() == 2


def test_lost_job_wakes_its_rollout(
    fleet: Fleet,
    release: Release,
    transport: RecordingTransport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    woken: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(
        deadlines,
        "enqueue_debounced_on_commit",
        lambda name, *args, key: woken.append((str(name), args)),
    )
    rollout = Rollout.objects.create(release=release, strategy=Rollout.Strategy.ROLLING)
    job = _running_job(fleet, release, transport)
    UpdateJob.objects.filter(pk=job.pk).update(rollout=rollout)
    assert deadlines.jobs_reap(now=T0 + timedelta(seconds=601)).no_progress == (job.pk,)
    assert woken == [("workers.tasks.drive_rollout", (rollout.pk,))]
    assert Event.objects.get(verb="job.lost").details["rollout_id"] == rollout.pk
