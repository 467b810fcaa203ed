"""The beat entry and its thin task."""

from __future__ import annotations

import pytest
from django.conf import settings
from pytest_django.fixtures import DjangoCaptureOnCommitCallbacks

from tenants.tasks import release_waiting_jobs
from tests.conftest import Fleet
from tests.tenants.conftest import waiting_job
from updates.jobs import services as jobs
from updates.models import Release, UpdateJob

pytestmark = pytest.mark.django_db


def test_beat_runs_the_release_every_30_seconds() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["release-waiting-jobs"]
    assert entry == {"task": "workers.tasks.release_waiting_jobs", "schedule": 30.0}


def test_task_releases_through_job_enqueue(
    fleet: Fleet,
    release: Release,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    job = waiting_job(fleet.node_b, release)  # tenant B has no windows: free to go
    sent: list[int] = []
    monkeypatch.setattr(jobs, "job_enqueue", lambda j, **kw: sent.append(j.pk))
    with django_capture_on_commit_callbacks(execute=True):
        assert release_waiting_jobs(unexpected="kwargs are tolerated") == [job.pk]
    assert sent == [job.pk]
    job.refresh_from_db()
    assert job.state == UpdateJob.State.QUEUED
