"""A rollout with a start time: created and planned now, started by the coordinator's beat
when its time comes (not before, once however many beats race), cancellable meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.urls import reverse
from django.utils import timezone

# The views tests' fixtures (a release, a three-node cluster, agents that receive nothing).
from tests.rollouts.test_rollout_views import Personas, _form, _no_agents, cluster_b, release
from updates.models import Cluster, Event, Release, Rollout, UpdateJob
from updates.rollouts import services
from updates.rollouts.tasks import drive_active_rollouts

pytestmark = pytest.mark.django_db
__all__ = ["_no_agents", "cluster_b", "release"]

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _schedule(personas: Personas, release: Release, cluster: Cluster, start_at: str) -> Rollout:
    with time_machine.travel(NOW, tick=False):
        response = personas["operator"].post(
            reverse("rollout_new"),
            _form(release, cluster=cluster.pk, start="1", start_at=start_at),
        )
    assert response.status_code == 302, response.content.decode()[-2000:]
    return Rollout.objects.get()


def test_a_scheduled_rollout_waits_planned_and_says_when(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    rollout = _schedule(personas, release, cluster_b, "2026-12-04T13:30:00")
    assert rollout.state == Rollout.State.PLANNED
    assert rollout.start_at == datetime(2026, 12, 4, 13, 30, tzinfo=UTC)
    assert rollout.started_at is None and not UpdateJob.objects.exists()
    event = Event.objects.get(verb="rollout.scheduled")
    assert event.details["start_at"] == "2026-12-04T13:30:00+00:00"
    with time_machine.travel(NOW, tick=False):
        body = personas["operator"].get(reverse("rollout_detail", args=[rollout.pk])).content
    assert b"Starts at" in body and b"2026-12-04 13:30:00 UTC" in body
    assert b'id="cancel-scheduled"' in body and b"hx-trigger=" in body  # watched until it starts


def test_the_beat_starts_it_at_its_time_and_only_once(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    rollout = _schedule(personas, release, cluster_b, "2026-12-04T13:30:00")
    assert services.rollouts_start_due(now=NOW + timedelta(minutes=89, seconds=59)) == []
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.PLANNED
    at = NOW + timedelta(minutes=90)
    with time_machine.travel(at, tick=False):
        assert services.rollouts_start_due(now=at) == [rollout.pk]
        assert services.rollouts_start_due(now=at) == []  # a second beat finds nothing
    rollout.refresh_from_db()
    assert rollout.state == Rollout.State.RUNNING and rollout.started_at == at
    started = Event.objects.get(verb="rollout.started")
    assert started.actor_label == "system"


def test_the_reaper_task_starts_a_due_rollout_and_drives_it(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    start_at = timezone.now() + timedelta(seconds=30)
    typed = f"{start_at:%Y-%m-%dT%H:%M:%S}"
    with time_machine.travel(start_at - timedelta(seconds=60), tick=False):
        response = personas["operator"].post(
            reverse("rollout_new"),
            _form(release, cluster=cluster_b.pk, start="1", start_at=typed),
        )
    assert response.status_code == 302
    drive_active_rollouts()
    assert Rollout.objects.get().state == Rollout.State.PLANNED  # not yet
    with time_machine.travel(start_at + timedelta(seconds=1), tick=False):
        drive_active_rollouts()
    rollout = Rollout.objects.get()
    assert rollout.state == Rollout.State.RUNNING
    assert UpdateJob.objects.filter(rollout=rollout).count() == 1  # driven: the canary's node


def test_a_rollout_cancelled_before_its_time_never_starts(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    rollout = _schedule(personas, release, cluster_b, "2026-12-04T13:30:00")
    response = personas["operator"].post(reverse("rollout_cancel", args=[rollout.pk]))
    assert response.status_code == 302
    assert services.rollouts_start_due(now=NOW + timedelta(days=1)) == []
    rollout.refresh_from_db()
    assert rollout.state in (Rollout.State.CANCELLING, Rollout.State.CANCELLED)
    assert rollout.started_at is None and not UpdateJob.objects.exists()


@pytest.mark.parametrize(
    ("start_at", "reason"),
    [
        ("2026-12-04T11:59:59", "The start time has passed"),
        ("2027-01-04T12:00:01", "At most 30 days ahead"),
        ("tomorrow", "Enter a valid date/time"),
    ],
)
def test_a_start_time_in_the_past_or_too_far_ahead_is_refused(
    personas: Personas, release: Release, cluster_b: Cluster, start_at: str, reason: str
) -> None:
    with time_machine.travel(NOW, tick=False):
        response = personas["operator"].post(
            reverse("rollout_new"),
            _form(release, cluster=cluster_b.pk, start="1", start_at=start_at),
        )
    assert response.status_code == 400
    body = response.content.decode()
    named = body[body.index('data-field="start_at"') :]
    assert reason in named[: named.index("</p>")]
    assert not Rollout.objects.exists()


def test_only_a_planned_rollout_can_be_scheduled(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    rollout = _schedule(personas, release, cluster_b, "2026-12-04T13:30:00")
    Rollout.objects.filter(pk=rollout.pk).update(state=Rollout.State.RUNNING)
    with pytest.raises(services.RolloutError, match="RUNNING: cannot be scheduled"):
        services.rollout_schedule(rollout=rollout, user=None, start_at=NOW)


def test_a_rollout_another_beat_started_first_is_left_and_the_others_start(
    personas: Personas, release: Release, cluster_b: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _schedule(personas, release, cluster_b, "2026-12-04T13:30:00")
    second = Rollout.objects.create(
        release=release, strategy="canary", state="PLANNED", start_at=first.start_at
    )
    real_start = services.rollout_start

    def raced(*, rollout: Rollout, user: object) -> Rollout:
        if rollout.pk == first.pk:
            # Another beat (or an operator's cancel) got there between the read and the start.
            Rollout.objects.filter(pk=first.pk).update(state=Rollout.State.RUNNING)
        return real_start(rollout=rollout, user=None)

    monkeypatch.setattr(services, "rollout_start", raced)
    assert services.rollouts_start_due(now=NOW + timedelta(hours=2)) == [second.pk]
    assert Event.objects.filter(verb="rollout.started").count() == 1
