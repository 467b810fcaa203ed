"""Whoever watches a job hears of its changes: a report, a final report or a cancel
announces the job's node and, for a rollout's job, its rollout (the pages' live topics);
and a contract job records who asked for it and for which rollout."""

from __future__ import annotations

import pytest

from tests.conftest import Fleet
from tests.factories import make_release, make_user
from tests.jobs.test_outbox import RecordingTransport
from updates.jobs import services as jobs
from updates.live.services import Topic
from updates.models import Release, Rollout, UpdateJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def release(db: None) -> Release:
    return make_release(version="1.7.0", sha256="ab" * 32, artifact="releases/x.tar")


@pytest.fixture
def announced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Topic, ...]]:
    heard: list[tuple[Topic, ...]] = []
    monkeypatch.setattr(jobs, "announce", lambda *topics: heard.append(topics))
    return heard


def _rollout_job(fleet: Fleet, release: Release) -> tuple[UpdateJob, Rollout]:
    rollout = Rollout.objects.create(release=release, name="r")
    job = jobs.job_start_update(
        node=fleet.node_a, release=release, user=None, transport=RecordingTransport()
    )
    UpdateJob.objects.filter(pk=job.pk).update(rollout=rollout)
    job.refresh_from_db()
    return job, rollout


def test_reports_announce_the_jobs_node_and_rollout(
    fleet: Fleet, release: Release, announced: list[tuple[Topic, ...]]
) -> None:
    job, rollout = _rollout_job(fleet, release)
    watched = (Topic.node("a-1"), Topic.rollout(rollout.pk))
    announced.clear()
    jobs.job_record_progress(job_id=job.pk, node_id="a-1", step="PREFLIGHT")
    assert announced == [watched]
    jobs.job_finish(job_id=job.pk, node_id="a-1", ok=True, result={"version_to": "1.7.0"})
    assert announced[1:] == [watched]


def test_a_cancel_announces_the_jobs_node_and_rollout(
    fleet: Fleet, release: Release, announced: list[tuple[Topic, ...]]
) -> None:
    job, rollout = _rollout_job(fleet, release)
    announced.clear()
    assert jobs.job_cancel(job=job, user=None) == UpdateJob.State.CANCELLED
    assert announced == [(Topic.node("a-1"), Topic.rollout(rollout.pk))]


def test_a_contract_job_records_who_asked_and_its_rollout(fleet: Fleet, release: Release) -> None:
    olivia = make_user(username="olivia")
    rollout = Rollout.objects.create(release=release, name="r")
    job = jobs.job_start_contract(
        node=fleet.node_a,
        release=release,
        user=olivia,
        transport=RecordingTransport(),
        rollout=rollout,
    )
    job.refresh_from_db()
    assert (job.kind, job.created_by, job.rollout, job.release) == (
        UpdateJob.Kind.CONTRACT,
        olivia,
        rollout,
        release,
    )
    assert (job.restore_point, job.restore_version) == ("", "")  # nothing to restore
