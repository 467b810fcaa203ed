"""A rollout meets a maintenance window, in-process: the rollout is driven and waiting
jobs are released as the beat does it, on an injected or frozen clock, with a recording
transport in place of the broker. The node waits, is released the second the window
opens, and the rollout completes; a window that closes mid-rollout lets the node in
flight finish but starts no new node of that tenant."""

from __future__ import annotations

from datetime import time, timedelta
from functools import partial
from typing import Any

import pytest
from django.core.files.base import ContentFile
from pytest_django.fixtures import DjangoCaptureOnCommitCallbacks
from time_machine import TimeMachineFixture

from tenants.models import MaintenanceWindow
from tenants.services import waiting_jobs_release
from tests.conftest import Fleet
from tests.factories import make_node, make_release
from tests.tenants.conftest import utc
from updates.jobs import services as jobs
from updates.models import Event, Node, Release, RolloutNode, UpdateJob
from updates.releases.services import release_deprecate
from updates.rollouts.coordinator import DriveContext, DriveOutcome, rollout_drive
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
    assert state == DriveOutcome.COMPLETED
    assert _job(node).state == S.DONE
    assert list(RolloutNode.objects.filter(rollout=rollout).values_list("state", flat=True)) == [
        "DONE"
    ]
    assert transport.sent == [(node.node_id, str(job.pk))]  # nothing sent twice


def test_a_window_closing_mid_rollout_finishes_the_node_in_flight_and_starts_no_new_one(
    fleet: Fleet,
    published: Release,
    window: MaintenanceWindow,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    transport = RecordingTransport()
    first, second = fleet.node_a_standalone, make_node(node_id="a-solo-2", tenant=fleet.tenant_a)
    rollout = rollout_create(
        release=published, strategy="rolling", nodes=[first, second], user=None
    )
    rollout_start(rollout=rollout, user=None)
    closing = utc(2027, 1, 5, 8, 59, 50)  # 03:59:50 New York, ten seconds before the close
    with django_capture_on_commit_callbacks(execute=True):
        rollout_drive(rollout.pk, ctx=DriveContext(transport=transport, now=closing))
    assert _job(first).state == S.QUEUED
    assert not UpdateJob.objects.filter(node=second).exists()  # one at a time

    assert transport.sent == [(first.node_id, str(_job(first).pk))]

    # The first node finishes after the window closed: its result stands.
    jobs.job_finish(job_id=_job(first).pk, node_id=first.node_id, ok=True, result={})
    after = closing + timedelta(seconds=20)
    with django_capture_on_commit_callbacks(execute=True):
        state = rollout_drive(rollout.pk, ctx=DriveContext(transport=transport, now=after))
    assert state == DriveOutcome.RUNNING  # not over: the second node waits for its window
    assert _job(first).state == S.DONE
    held = _job(second)
    assert held.state == S.WAITING_FOR_WINDOW
    assert held.wait_reason == (
        "outside maintenance windows; next window Wed 02:00 America/New_York"
    )
    assert len(transport.sent) == 1  # nothing was sent for the second node


def test_release_without_an_injected_clock_reads_the_current_time(
    fleet: Fleet,
    published: Release,
    window: MaintenanceWindow,
    time_machine: TimeMachineFixture,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    """As the beat calls it: no `at`, so the release reads the (frozen) clock."""
    time_machine.move_to(T0, tick=False)
    job = UpdateJob.objects.create(
        node=fleet.node_a_standalone, release=published, state=S.WAITING_FOR_WINDOW
    )
    started: list[int] = []

    def release() -> list[int]:
        with django_capture_on_commit_callbacks(execute=True):
            return waiting_jobs_release(start_job=lambda j: started.append(j.pk))

    assert release() == [] and started == []  # 01:59:57 in New York
    time_machine.shift(timedelta(seconds=2, microseconds=999_999))
    assert release() == [] and started == []  # a microsecond before 02:00
    time_machine.shift(timedelta(microseconds=1))
    assert release() == [job.pk] and started == [job.pk]
    job.refresh_from_db()
    assert job.state == S.QUEUED


def test_a_job_parked_for_a_release_deprecated_since_ends_cancelled_and_is_never_sent(
    fleet: Fleet,
    published: Release,
    window: MaintenanceWindow,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    transport = RecordingTransport()
    node = fleet.node_a_standalone
    job = jobs.job_start_update(node=node, release=published, user=None, now=T0)
    assert job.state == S.WAITING_FOR_WINDOW
    release_deprecate(release=published, user=None)
    with django_capture_on_commit_callbacks(execute=True):
        released = waiting_jobs_release(
            at=T0 + timedelta(seconds=3), start_job=partial(jobs.job_enqueue, transport=transport)
        )
    # The window is open, but the release may no longer be installed.
    assert released == []
    job.refresh_from_db()
    assert job.state == S.CANCELLED and job.finished_at == T0 + timedelta(seconds=3)
    assert job.error_message == "release 1.7.0 was deprecated before the job could start"
    assert transport.sent == []
    assert Event.objects.filter(verb="job.cancelled", object_id=str(job.pk)).exists()
