"""A multi-component job: its command lists every step's bundle, its one token opens
each release of its plan and nothing else, and a release a plan names cannot be deleted."""

from __future__ import annotations

import hashlib

import pytest
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from tests.releases.conftest import payload, streamed_body
from updates.jobs.outbox import apply_kwargs
from updates.models import Release, UpdateJob
from updates.releases.artifacts import artifact_url, job_download_token
from updates.releases.services import ReleaseInUse, release_delete

pytestmark = pytest.mark.django_db


def _release(product: str, version: str, seed: int) -> Release:
    content = payload(2_000, seed=seed)
    release = Release(
        product=product,
        version=version,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )
    release.artifact.save(f"{product}-{version}.tar", ContentFile(content), save=False)
    release.save()
    return release


@pytest.fixture
def storage() -> Release:
    return _release("themis-storage", "1.4.2", seed=1)


@pytest.fixture
def server() -> Release:
    return _release("themisdb", "1.5.0", seed=2)


@pytest.fixture
def job(fleet: Fleet, storage: Release, server: Release) -> UpdateJob:
    plan = [
        {"product": "themis-storage", "version": "1.4.2", "from_version": "1.3.0",
         "release_id": storage.pk},
        {"product": "themisdb", "version": "1.5.0", "from_version": "1.4.0",
         "release_id": server.pk},
    ]  # fmt: skip
    return UpdateJob.objects.create(node=fleet.node_a, release=server, plan=plan)


def _get(job: UpdateJob, release_id: int, token: str | None) -> tuple[int, bytes]:
    url = reverse("artifact_job_plan_bundle", kwargs={"job_id": job.pk, "release_id": release_id})
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = Client().get(url, headers=headers)
    body = streamed_body(response) if response.streaming else response.content
    return response.status_code, body


def test_the_command_lists_every_step_in_order_and_keeps_the_target_on_top(
    job: UpdateJob, storage: Release, server: Release
) -> None:
    kwargs = apply_kwargs(job, {})
    # An agent without plan support reads only these: the target's bundle, as before.
    assert (kwargs["version"], kwargs["sha256"], kwargs["size"]) == (
        "1.5.0",
        server.sha256,
        server.size,
    )
    assert kwargs["artifact_url"] == artifact_url(job)
    assert [(s["product"], s["version"]) for s in kwargs["plan"]] == [
        ("themis-storage", "1.4.2"),
        ("themisdb", "1.5.0"),
    ]
    first, last = kwargs["plan"]
    assert (first["sha256"], first["size"]) == (storage.sha256, storage.size)
    assert first["artifact_url"].endswith(f"/artifacts/jobs/{job.pk}/releases/{storage.pk}/bundle")
    assert last["artifact_url"] == artifact_url(job)


def test_a_single_step_job_sends_no_plan(fleet: Fleet, server: Release) -> None:
    plan = [{"product": "themisdb", "version": "1.5.0", "from_version": "1.4.0",
             "release_id": server.pk}]  # fmt: skip
    job = UpdateJob.objects.create(node=fleet.node_a, release=server, plan=plan)
    assert "plan" not in apply_kwargs(job, {})
    legacy = UpdateJob.objects.create(
        node=fleet.node_b, release=server, state=UpdateJob.State.QUEUED
    )
    assert "plan" not in apply_kwargs(legacy, {})


def test_a_lone_step_of_another_component_goes_as_a_plan(fleet: Fleet, storage: Release) -> None:
    plan = [{"product": "themis-storage", "version": "1.4.2", "from_version": "1.3.0",
             "release_id": storage.pk}]  # fmt: skip
    job = UpdateJob.objects.create(node=fleet.node_a, release=storage, plan=plan)
    kwargs = apply_kwargs(job, {})
    # Only a plan names the component whose dirs the bundle goes into.
    assert [(s["product"], s["artifact_url"]) for s in kwargs["plan"]] == [
        ("themis-storage", artifact_url(job))
    ]
    assert kwargs["artifact_url"] == artifact_url(job)


def test_the_jobs_token_opens_each_release_of_its_plan(
    job: UpdateJob, storage: Release, server: Release
) -> None:
    token = job_download_token(job)
    status, body = _get(job, storage.pk, token)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == storage.sha256
    status, body = _get(job, server.pk, token)
    assert (status, hashlib.sha256(body).hexdigest()) == (200, server.sha256)


def test_a_release_outside_the_plan_is_refused_whatever_the_token(
    fleet: Fleet, job: UpdateJob
) -> None:
    other = _release("themis-query", "1.4.5", seed=3)
    status, body = _get(job, other.pk, job_download_token(job))
    assert status == 403
    assert b"not in job" in body
    # Nor may another job's token open this job's steps.
    stranger = UpdateJob.objects.create(node=fleet.node_b, release=other)
    status, _ = _get(job, other.pk, job_download_token(stranger))
    assert status == 403
    assert _get(job, other.pk, None)[0] == 403


def test_a_finished_jobs_plan_is_closed(job: UpdateJob, storage: Release) -> None:
    UpdateJob.objects.filter(pk=job.pk).update(state=UpdateJob.State.DONE)
    assert _get(job, storage.pk, job_download_token(job))[0] == 410


def test_a_release_a_plan_names_cannot_be_deleted(job: UpdateJob, storage: Release) -> None:
    with pytest.raises(ReleaseInUse, match="1 update job"):
        release_delete(release=storage, user=None)
    assert Release.objects.filter(pk=storage.pk).exists()


def test_a_release_no_plan_names_can_still_be_deleted(job: UpdateJob) -> None:
    loose = _release("themis-query", "1.4.5", seed=3)
    release_delete(release=loose, user=None)
    assert not Release.objects.filter(pk=loose.pk).exists()
