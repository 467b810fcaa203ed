"""A rollout meets a maintenance window: the node waits, the beat releases it
when the window opens (a few seconds later, on an injected clock), and the
rollout proceeds; a window that closes mid-rollout lets the node in flight
finish but starts no new node of that tenant."""

from __future__ import annotations

import time as systime
from datetime import UTC, datetime, time, timedelta
from functools import partial
from typing import Any

import pytest
from django.core.files.base import ContentFile
from pytest_django.fixtures import DjangoCaptureOnCommitCallbacks

from tenants.models import MaintenanceWindow
from tenants.services import waiting_jobs_release
from tests.conftest import Fleet
from tests.factories import make_node, make_release
from tests.tenants.conftest import utc
from updates.jobs import services as jobs
from updates.models import Node, Release, UpdateJob
from updates.rollouts.coordinator import DriveContext, rollout_drive
from updates.rollouts.services import rollout_create, rollout_start

pytestmark = pytest.mark.django_db

S = UpdateJob.State
# 01:59:57 in New York: the 02:00-04:00 window opens three seconds later.
T0 = utc(2027, 1, 5, 6, 59, 57)


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        self.sent.append((node_id, job_id))

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        self.sent.append((node_id, f"rollback {job_id}"))

    def health_check(self, node_id: str) -> dict[str, Any]:
        return {"ok": True}

    def set_traffic_role(self, node_id: str, role: str) -> None:  # pragma: no cover
        pass


@pytest.fixture
def published(db: None) -> Release:
    release = make_release(version="1.7.0")
    release.artifact.save("themisdb-1.7.0.tar", ContentFile(b"bundle"), save=True)
    return release


@pytest.fixture
def window(fleet: Fleet) -> MaintenanceWindow:
    return MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=time(2),
        end_time=time(4),
        timezone="America/New_York",
    )


def _job(node: Node) -> UpdateJob:
    return UpdateJob.objects.filter(node=node).latest("created_at")


def test_rollout_waits_for_the_window_then_proceeds(
    fleet: Fleet,
    published: Release,
    window: MaintenanceWindow,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    transport = RecordingTransport()
    start_job = partial(jobs.job_enqueue, transport=transport)
    node = fleet.node_a_standalone
    rollout = rollout_create(release=published, strategy="rolling", nodes=[node], user=None)
    rollout_start(rollout=rollout, user=None)

    rollout_drive(rollout.pk, ctx=DriveContext(transport=transport, now=T0))
    job = _job(node)
    assert job.state == S.WAITING_FOR_WINDOW
    assert job.wait_reason == "outside maintenance windows; next window Tue 02:00 America/New_York"
    assert transport.sent == []

    with django_capture_on_commit_callbacks(execute=True):
        assert waiting_jobs_release(at=T0 + timedelta(seconds=2), start_job=start_job) == []
    assert _job(node).state == S.WAITING_FOR_WINDOW and transport.sent == []

    with django_capture_on_commit_callbacks(execute=True):
        released = waiting_jobs_release(at=T0 + timedelta(seconds=3), start_job=start_job)
    assert released == [job.pk]
    assert _job(node).state == S.QUEUED
    assert transport.sent == [(node.node_id, str(job.pk))]

    # The agent reports back; the rollout carries on to its end.
    jobs.job_finish(job_id=job.pk, node_id=node.node_id, ok=True, result={"version_to": "1.7.0"})
    state = rollout_drive(
        rollout.pk, ctx=DriveContext(transport=transport, now=T0 + timedelta(seconds=5))
    )
    assert _job(node).state == S.DONE
    assert state not in ("RUNNING", "FAILED")


def test_a_window_closing_mid_rollout_finishes_the_node_in_flight_and_starts_no_new_one(
    fleet: Fleet, published: Release, window: MaintenanceWindow
) -> None:
    transport = RecordingTransport()
    first, second = fleet.node_a_standalone, make_node(node_id="a-solo-2", tenant=fleet.tenant_a)
    rollout = rollout_create(
        release=published, strategy="rolling", nodes=[first, second], user=None
    )
    rollout_start(rollout=rollout, user=None)
    closing = utc(2027, 1, 5, 8, 59, 50)  # 03:59:50 New York, ten seconds before the close
    rollout_drive(rollout.pk, ctx=DriveContext(transport=transport, now=closing))
    assert _job(first).state == S.QUEUED
    assert not UpdateJob.objects.filter(node=second).exists()  # one at a time

    # The first node finishes after the window closed: its result stands.
    jobs.job_finish(job_id=_job(first).pk, node_id=first.node_id, ok=True, result={})
    after = closing + timedelta(seconds=20)
    rollout_drive(rollout.pk, ctx=DriveContext(transport=transport, now=after))
    assert _job(first).state == S.DONE
    held = _job(second)
    assert held.state == S.WAITING_FOR_WINDOW
    assert "next window Wed 02:00 America/New_York" in held.wait_reason


def test_the_beat_releases_a_job_when_the_window_opens_in_real_time(
    fleet: Fleet,
    published: Release,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    """No injected clock: a window opening two seconds from now, polled like the beat."""
    opens = datetime.now(UTC) + timedelta(seconds=2)
    MaintenanceWindow.objects.create(
        tenant=fleet.tenant_a,
        days="0123456",
        start_time=opens.time().replace(microsecond=0),
        end_time=(opens + timedelta(hours=1)).time().replace(microsecond=0),
        timezone="UTC",
    )
    job = UpdateJob.objects.create(
        node=fleet.node_a_standalone, release=published, state=S.WAITING_FOR_WINDOW
    )
    started: list[int] = []
    deadline = systime.monotonic() + 10
    while not started and systime.monotonic() < deadline:
        with django_capture_on_commit_callbacks(execute=True):
            waiting_jobs_release(start_job=lambda j: started.append(j.pk))
        systime.sleep(0.25)
    job.refresh_from_db()
    assert started == [job.pk] and job.state == S.QUEUED
    assert datetime.now(UTC) >= opens.replace(microsecond=0)
