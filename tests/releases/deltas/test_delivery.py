"""Nodes on a delta's base version are sent the delta, with the full bundle as fallback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.db import transaction
from django.test import Client
from pytest_django import DjangoCaptureOnCommitCallbacks

from tests.conftest import Fleet
from tests.releases.conftest import streamed_body
from tests.releases.deltas.conftest import Publish
from updates.jobs import outbox
from updates.jobs import services as jobs
from updates.models import Node, Release, ReleaseFile, UpdateJob
from updates.releases import deltas
from updates.releases.artifacts import job_download_token

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

pytestmark = pytest.mark.django_db


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    # The options are the task's JSON keyword arguments (strings and numbers).
    def update_node(self, node_id: str, job_id: str, **options: Any) -> None:
        self.sent.append((node_id, job_id, options))

    def rollback_node(self, node_id: str, job_id: str, point_id: str | None = None) -> None:
        raise AssertionError("no rollbacks here")

    def health_check(self, node_id: str) -> dict[str, object]:
        return {}


@pytest.fixture
def release_with_delta(publish: Publish) -> tuple[Release, ReleaseFile]:
    publish("1.6.0")
    new = publish("1.7.0")
    (delta,) = deltas.release_deltas_generate(release_id=new.pk)
    return new, delta


def _start(
    node: Node,
    release: Release,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> tuple[UpdateJob, dict[str, Any]]:
    transport = RecordingTransport()
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.job_start_update(node=node, release=release, user=None, transport=transport)
    ((node_id, job_id, options),) = transport.sent
    assert (node_id, job_id) == (node.node_id, str(job.pk))
    return job, options


def test_node_on_the_base_version_gets_the_delta(
    fleet: Fleet,
    release_with_delta: tuple[Release, ReleaseFile],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    release, delta = release_with_delta
    Node.objects.filter(pk=fleet.node_a.pk).update(installed_version="1.6.0")
    job, options = _start(fleet.node_a, release, django_capture_on_commit_callbacks)
    assert options["artifact_url"].endswith(f"/artifacts/jobs/{job.pk}/bundle/delta-1.6.0")
    assert (options["sha256"], options["size"]) == (delta.sha256, delta.size)
    assert options["full_artifact_url"].endswith(f"/artifacts/jobs/{job.pk}/bundle")
    assert (options["full_sha256"], options["full_size"]) == (release.sha256, release.size)
    assert options["download_token"] and options["version"] == "1.7.0"


@pytest.mark.parametrize("installed", ["", "1.5.0", "1.7.0"])
def test_other_nodes_get_the_full_bundle(
    fleet: Fleet,
    release_with_delta: tuple[Release, ReleaseFile],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    installed: str,
) -> None:
    release, _delta = release_with_delta
    Node.objects.filter(pk=fleet.node_a.pk).update(installed_version=installed)
    job, options = _start(fleet.node_a, release, django_capture_on_commit_callbacks)
    assert options["artifact_url"].endswith(f"/artifacts/jobs/{job.pk}/bundle")
    assert (options["sha256"], options["size"]) == (release.sha256, release.size)
    assert not {"full_artifact_url", "full_sha256", "full_size"} & set(options)


def _get(url: str, token: str, **headers: str) -> _MonkeyPatchedWSGIResponse:
    return Client().get(url, headers={"Authorization": f"Bearer {token}", **headers})


def test_delta_is_served_for_the_jobs_token_only(
    fleet: Fleet,
    release_with_delta: tuple[Release, ReleaseFile],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    release, delta = release_with_delta
    Node.objects.filter(pk=fleet.node_a.pk).update(installed_version="1.6.0")
    job, options = _start(fleet.node_a, release, django_capture_on_commit_callbacks)
    url = options["artifact_url"]

    response = _get(url, options["download_token"])
    assert response.status_code == 200
    assert streamed_body(response) == Path(delta.file.path).read_bytes()
    assert response["ETag"] == f'"{delta.sha256}"'

    partial = _get(url, options["download_token"], Range="bytes=100-")
    assert partial.status_code == 206
    assert streamed_body(partial) == Path(delta.file.path).read_bytes()[100:]

    full = _get(options["full_artifact_url"], options["download_token"])
    assert streamed_body(full) == Path(release.artifact.path).read_bytes()

    other, _ = _start(fleet.node_a_standalone, release, django_capture_on_commit_callbacks)
    assert _get(url, job_download_token(other)).status_code == 403
    assert Client().get(url).status_code == 403
    missing = url.replace("delta-1.6.0", "delta-1.2.0")
    assert _get(missing, options["download_token"]).status_code == 404
    assert _get(url.replace("delta-1.6.0", "full"), options["download_token"]).status_code == 404


def test_commands_sent_together_each_get_the_bundle_for_their_nodes_version(
    fleet: Fleet,
    release_with_delta: tuple[Release, ReleaseFile],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    release, delta = release_with_delta
    Node.objects.filter(pk=fleet.node_a.pk).update(installed_version="1.6.0")
    Node.objects.filter(pk=fleet.node_b.pk).update(installed_version="1.5.0")
    transport = RecordingTransport()
    with (
        django_capture_on_commit_callbacks(execute=True),
        transaction.atomic(),
        outbox.relays_in_bulk(),
    ):
        for node in Node.objects.filter(pk__in=[fleet.node_a.pk, fleet.node_b.pk]):
            jobs.job_start_update(node=node, release=release, user=None, transport=transport)
    sent = {node_id: options for node_id, _, options in transport.sent}
    assert set(sent) == {fleet.node_a.node_id, fleet.node_b.node_id}
    on_base, elsewhere = sent[fleet.node_a.node_id], sent[fleet.node_b.node_id]
    assert on_base["artifact_url"].endswith("/bundle/delta-1.6.0")
    assert (on_base["sha256"], on_base["size"]) == (delta.sha256, delta.size)
    assert elsewhere["artifact_url"].endswith("/bundle")
    assert (elsewhere["sha256"], elsewhere["size"]) == (release.sha256, release.size)
