"""A job's own page: what it does and its log as the agent reported it, newest last,
refreshed while the job runs; scoped like its node."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from pytest_django.fixtures import Settings

from tests.conftest import Fleet
from tests.factories import make_release
from tests.fakes import NullTransport
from updates.jobs import services as jobs
from updates.models import UpdateJob

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "default_transport", NullTransport)


def _job_through_its_steps(fleet: Fleet, *, ok: bool) -> UpdateJob:
    release = make_release(version="1.7.0", sha256="ab" * 32)
    start = timezone.now() - timedelta(minutes=5)
    with time_machine.travel(start, tick=False):
        job = jobs.job_start_update(node=fleet.node_a, release=release, user=None)
    for seconds, step, percent in [
        (1, "PREFLIGHT", 5),
        (2, "DOWNLOADING", 30),
        (9, "SWITCHING", 80),
    ]:
        with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
            jobs.job_record_progress(job_id=job.pk, node_id="a-1", step=step, percent=percent)
    with time_machine.travel(start + timedelta(seconds=12), tick=False):
        jobs.job_finish(
            job_id=job.pk,
            node_id="a-1",
            ok=ok,
            error_code="" if ok else "HEALTH_CHECK_FAILED_ROLLED_BACK",
            error_message="" if ok else "health URL answered 500",
            result={"version_to": "1.7.0"} if ok else {},
        )
    job.refresh_from_db()
    return job


def _log(body: str) -> list[str]:
    section = body[body.index('id="job-log"') :]
    section = section[: section.index("</table>")]
    return [chunk.split('"', 1)[0] for chunk in section.split('data-what="')[1:]]


def test_a_failed_jobs_page_tells_its_story_in_order(
    personas: dict[str, Client], fleet: Fleet
) -> None:
    job = _job_through_its_steps(fleet, ok=False)
    response = personas["operator"].get(reverse("node_job", args=["a-1", job.pk]))
    assert response.status_code == 200
    body = response.content.decode()
    assert _log(body) == [
        "update.queued",
        "preflight",
        "downloading",
        "applying",
        job.state.lower(),
    ]
    assert "HEALTH_CHECK_FAILED_ROLLED_BACK: health URL answered 500" in body
    assert '<span class="detail-key">percent</span> 30' in body
    assert "hx-trigger" not in body  # finished: nothing to refresh
    node_page = personas["operator"].get(reverse("node_detail", args=["a-1"])).content.decode()
    assert reverse("node_job", args=["a-1", job.pk]) in node_page


def test_a_running_jobs_page_refreshes_itself(personas: dict[str, Client], fleet: Fleet) -> None:
    """Told by its node's event stream, with a slow poll beside it; app.js polls it every
    500 ms while the stream is down (the browser tests run both)."""
    release = make_release(version="1.7.0", sha256="ab" * 32)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None)
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="DOWNLOADING", percent=40)
    url = reverse("node_job", args=["a-1", job.pk])
    body = personas["operator"].get(url).content.decode()
    assert f'sse-connect="{reverse("live_node", args=["a-1"])}"' in body
    assert 'hx-trigger="sse:changed, themis:poll, every 10s"' in body
    assert 'data-live-poll="500"' in body and "40 %" in body
    partial = personas["operator"].get(url, headers={"HX-Request": "true"}).content.decode()
    assert partial.lstrip().startswith('<div id="job-live"')
    assert "sse-connect" not in partial  # the stream's element is not swapped


def test_without_live_updates_a_running_jobs_page_polls(
    personas: dict[str, Client], fleet: Fleet, settings: Settings
) -> None:
    settings.THEMIS_LIVE_UPDATES = False
    release = make_release(version="1.7.0", sha256="ab" * 32)
    job = jobs.job_start_update(node=fleet.node_a, release=release, user=None)
    body = personas["operator"].get(reverse("node_job", args=["a-1", job.pk])).content.decode()
    assert 'hx-trigger="every 500ms"' in body
    assert "sse-connect" not in body


@pytest.mark.parametrize(("persona", "status"), [("admin_a", 200), ("admin_b", 404)])
def test_a_jobs_page_is_scoped_like_its_node(
    personas: dict[str, Client], fleet: Fleet, persona: str, status: int
) -> None:
    job = _job_through_its_steps(fleet, ok=True)
    assert personas[persona].get(reverse("node_job", args=["a-1", job.pk])).status_code == status
    # Another node's job through this node's address: not found either.
    assert personas["operator"].get(reverse("node_job", args=["b-1", job.pk])).status_code == 404
