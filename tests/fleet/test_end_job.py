"""An operator ends a stuck job from the node page: POST only, scoped to what the user
may see, recorded with who and why; the job ends LOST and its node is free again."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.factories import make_release
from tests.jobs.test_outbox import RecordingTransport
from updates.jobs import services as jobs
from updates.models import Event, NodeCommand, UpdateJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def stuck(fleet: Fleet) -> UpdateJob:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=RecordingTransport()
    )
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING")
    return job


def _url(job: UpdateJob) -> str:
    return reverse("node_end_job", args=["a-1", job.pk])


def test_operator_ends_a_stuck_job_and_it_is_recorded(
    personas: dict[str, Client], stuck: UpdateJob
) -> None:
    client = personas["operator"]
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "End this job" in page and _url(stuck) in page
    response = client.post(_url(stuck), {"reason": "node decommissioned"})
    assert response.status_code == 302
    stuck.refresh_from_db()
    assert (stuck.state, stuck.error_code) == (UpdateJob.State.LOST, "LOST")
    assert stuck.error_message == "ended by olivia: node decommissioned"
    event = Event.objects.get(verb="job.lost", object_id=str(stuck.pk))
    assert event.actor is not None and event.actor.username == "olivia"
    assert event.details["reason"] == "ended by olivia: node decommissioned"
    # nothing is left to (re-)send for the job
    assert not NodeCommand.objects.filter(job=stuck, state__in=NodeCommand.OPEN_STATES).exists()
    # the node takes a new job; the page no longer offers to end one
    assert "End this job" not in client.get(reverse("node_detail", args=["a-1"])).content.decode()
    again = client.post(_url(stuck), {"reason": "twice"}, follow=True)
    assert "had already ended" in again.content.decode()
    assert Event.objects.filter(verb="job.lost").count() == 1


def test_get_is_refused(personas: dict[str, Client], stuck: UpdateJob) -> None:
    assert personas["operator"].get(_url(stuck)).status_code == 405
    assert UpdateJob.objects.get(pk=stuck.pk).state == UpdateJob.State.DOWNLOADING


@pytest.mark.parametrize(
    ("persona", "status"),
    [("admin_b", 404), ("admin_a", 403), ("responder", 403), ("anonymous", 302)],
)
def test_others_cannot_end_a_job(
    personas: dict[str, Client], stuck: UpdateJob, persona: str, status: int
) -> None:
    response = personas[persona].post(_url(stuck), {"reason": "x"})
    assert response.status_code == status
    if persona == "anonymous":
        assert "/login" in response["Location"]
    stuck.refresh_from_db()
    assert stuck.state == UpdateJob.State.DOWNLOADING
    assert not Event.objects.filter(verb="job.lost").exists()
    assert NodeCommand.objects.get(job=stuck).state == NodeCommand.State.ACKED


def test_a_job_of_another_node_is_404(
    personas: dict[str, Client], fleet: Fleet, stuck: UpdateJob
) -> None:
    url = reverse("node_end_job", args=["a-solo", stuck.pk])
    assert personas["operator"].post(url).status_code == 404
    assert UpdateJob.objects.get(pk=stuck.pk).state == UpdateJob.State.DOWNLOADING


def _cancel_url(job: UpdateJob) -> str:
    return reverse("node_cancel_job", args=["a-1", job.pk])


def test_operator_cancels_a_queued_job_from_the_node_page(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    release = make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=RecordingTransport()
    )
    client = personas["operator"]
    page = client.get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "Cancel this job" in page and _cancel_url(job) in page
    response = client.post(_cancel_url(job), follow=True)
    assert f"Job {job.pk} on a-1 cancelled." in response.content.decode()
    assert UpdateJob.objects.get(pk=job.pk).state == UpdateJob.State.CANCELLED
    event = Event.objects.get(verb="job.cancelled", object_id=str(job.pk))
    assert event.actor is not None and event.actor.username == "olivia"


def test_a_started_job_cannot_be_cancelled_and_tenant_admins_cannot_cancel(
    personas: dict[str, Client], stuck: UpdateJob
) -> None:
    page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert "Cancel this job" not in page
    refused = personas["operator"].post(_cancel_url(stuck), follow=True)
    assert "can no longer be cancelled" in refused.content.decode()
    assert personas["admin_a"].post(_cancel_url(stuck)).status_code == 403
    assert personas["admin_b"].post(_cancel_url(stuck)).status_code == 404
    assert UpdateJob.objects.get(pk=stuck.pk).state == UpdateJob.State.DOWNLOADING
