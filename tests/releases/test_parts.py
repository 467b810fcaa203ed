"""Delivery by parts, dashboard side: a published release's parts are extracted after the
engine verifies the bundle again, served with the job's token and Range, named in the apply
command when they exist, collected when the release goes; and, end to end over real HTTP, a
node running N fetches N+1 through the dashboard's view asking only for what changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from pytest_django import DjangoCaptureOnCommitCallbacks, Settings
from pytest_django.live_server_helper import LiveServer

from tests.agent import parts_fixtures
from tests.agent.parts_fixtures import CHANGED, Node, Releases, sha, tree
from tests.conftest import Fleet
from tests.releases.conftest import MakeJob, streamed_body
from updates import taskqueue
from updates.engine import apply as engine
from updates.engine.bundle import read_manifest
from updates.engine.devpki import Pki
from updates.jobs.outbox import apply_kwargs
from updates.models import Release, ReleaseFile, UpdateJob
from updates.releases import parts
from updates.releases.artifacts import job_download_token
from updates.releases.services import release_delete, release_publish
from updates.releases.tasks import extract_release_parts
from updates.taskqueue import TaskName
from workers.parts import fetch_by_parts

pytestmark = pytest.mark.django_db

# Releases N and N+1 and a node, as the agent's tests have them.
releases = parts_fixtures.releases
node = parts_fixtures.node


def publish(path: Path) -> Release:
    return release_publish(upload=SimpleUploadedFile(path.name, path.read_bytes()), user=None)


@pytest.fixture
def published(trusted: Pki, releases: Releases) -> tuple[Release, Release]:
    return publish(releases.n), publish(releases.n1)


def get(job: UpdateJob, name: str, token: str | None = None, **headers: str) -> tuple[Any, bytes]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = reverse("artifact_job_parts", kwargs={"job_id": job.pk, "name": name})
    response = Client().get(url, headers=headers)
    body = streamed_body(response) if response.streaming else response.content
    return response, body


def stored(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_publishing_queues_the_extraction(
    trusted: Pki,
    releases: Releases,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    settings: Settings,
) -> None:
    settings.THEMIS_DELTA_BASES = 0
    sent: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(taskqueue, "send_task", lambda name, *a, **_k: sent.append((name, a)))
    with django_capture_on_commit_callbacks(execute=True):
        release = publish(releases.n1)
    assert sent == [(TaskName.EXTRACT_RELEASE_PARTS, (release.pk,))]


def test_extraction_stores_the_signed_manifest_and_one_object_per_content(
    published: tuple[Release, Release], releases: Releases, settings: Settings
) -> None:
    _, n1 = published
    assert not parts.release_parts_ready(n1)
    assert extract_release_parts.run(n1.pk) is True
    root = Path(settings.MEDIA_ROOT) / "parts"
    manifest, signature = read_manifest(releases.n1)
    release_dir = root / "releases" / n1.sha256
    assert (release_dir / "manifest.json").read_bytes() == manifest
    assert (release_dir / "manifest.json.p7s").read_bytes() == signature
    objects = sorted(p.name for p in (root / "objects").glob("*/*"))
    assert objects == sorted({sha(d) for d in releases.files_n1.values()})
    for data in releases.files_n1.values():
        assert (root / "objects" / sha(data)[:2] / sha(data)).read_bytes() == data
    summary = parts.release_parts_summary(n1)
    assert summary is not None and summary["files"] == len(releases.files_n1)
    assert summary["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    before = stored(root)
    assert parts.release_parts_extract(release_id=n1.pk) is True  # idempotent
    assert stored(root) == before
    assert not any(p.name.startswith(".work-") for p in root.iterdir())


def test_a_bundle_that_no_longer_verifies_gets_no_parts(
    published: tuple[Release, Release], settings: Settings, test_pki: Pki
) -> None:
    _, n1 = published
    settings.THEMIS_TRUST_ANCHOR = test_pki.rogue_root  # another anchor than at publish
    assert parts.release_parts_extract(release_id=n1.pk) is False
    assert not parts.release_parts_ready(n1)
    root = Path(settings.MEDIA_ROOT) / "parts"
    assert [name for name in stored(root) if not name.endswith(".pending")] == []
    # Each try reads the whole bundle: jobs that need the parts do not ask again at once.
    assert parts.release_parts_schedule(n1) is False


@pytest.fixture
def job(published: tuple[Release, Release], fleet: Fleet, make_job: MakeJob) -> UpdateJob:
    _, n1 = published
    parts.release_parts_extract(release_id=n1.pk)
    return make_job(n1, fleet.node_a)


def test_parts_are_served_with_the_jobs_token_and_ranges(
    job: UpdateJob, releases: Releases
) -> None:
    token = job_download_token(job)
    manifest, signature = read_manifest(releases.n1)
    assert get(job, "manifest.json", token)[1] == manifest
    assert get(job, "manifest.json.p7s", token)[1] == signature
    binary = releases.files_n1["bin/themisd"]
    response, body = get(job, sha(binary), token)
    assert response.status_code == 200 and body == binary
    assert response["ETag"] == f'"{sha(binary)}"' and "no-store" in response["Cache-Control"]
    response, body = get(
        job, sha(binary), token, Range="bytes=100-", **{"If-Range": f'"{sha(binary)}"'}
    )
    assert response.status_code == 206 and body == binary[100:]
    assert response["Content-Range"] == f"bytes 100-{len(binary) - 1}/{len(binary)}"


def test_parts_are_refused_without_the_token_or_outside_the_release(
    job: UpdateJob, releases: Releases, published: tuple[Release, Release], fleet: Fleet,
    make_job: MakeJob,
) -> None:  # fmt: skip
    binary = releases.files_n1["bin/themisd"]
    assert get(job, sha(binary))[0].status_code == 403
    assert get(job, sha(binary), "forged")[0].status_code == 403
    token = job_download_token(job)
    # N's old binary is stored (N+1 changed it)... only if N has parts: it has none here,
    # and even then the job's release does not list it.
    old = releases.files_n["bin/themisd"]
    assert get(job, sha(old), token)[0].status_code == 404
    assert get(job, "settings.py", token)[0].status_code == 404
    assert get(job, "0" * 64, token)[0].status_code == 404
    other = make_job(published[0], fleet.node_b)  # N: no parts extracted
    assert get(other, "manifest.json", job_download_token(other))[0].status_code == 404
    UpdateJob.objects.filter(pk=job.pk).update(state=UpdateJob.State.DONE)
    assert get(job, "manifest.json", token)[0].status_code == 410


def test_the_apply_command_names_the_parts_once_they_exist(
    published: tuple[Release, Release],
    fleet: Fleet,
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
    settings: Settings,
) -> None:
    _, n1 = published
    sent: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(taskqueue, "send_task", lambda name, *a, **_k: sent.append((name, a)))
    job = make_job(n1, fleet.node_a)
    with django_capture_on_commit_callbacks(execute=True):
        args = apply_kwargs(job, {})
    assert "parts_url" not in args and args["artifact_url"].endswith(f"/jobs/{job.pk}/bundle")
    assert sent == []  # the publish queued the extraction a moment ago
    # That extraction got lost: once its time is up, the next job that needs the parts
    # queues it again, once.
    marker = Path(settings.MEDIA_ROOT) / "parts" / "releases" / f"{n1.sha256}.pending"
    long_ago = marker.stat().st_mtime - parts.PENDING_SECONDS - 1
    os.utime(marker, (long_ago, long_ago))
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            assert "parts_url" not in apply_kwargs(job, {})
    assert sent == [(TaskName.EXTRACT_RELEASE_PARTS, (n1.pk,))]
    parts.release_parts_extract(release_id=n1.pk)
    args = apply_kwargs(job, {})
    assert args["parts_url"].endswith(f"/artifacts/jobs/{job.pk}/parts/")
    assert args["artifact_url"].endswith(f"/jobs/{job.pk}/bundle")  # the fallback stays


def test_a_delta_for_the_node_takes_precedence_over_parts(
    published: tuple[Release, Release], fleet: Fleet, make_job: MakeJob
) -> None:
    n, n1 = published
    parts.release_parts_extract(release_id=n1.pk)
    fleet.node_a.installed_version = n.version
    fleet.node_a.save()
    delta = ReleaseFile(release=n1, base_version=n.version, size=10, sha256="d" * 64)
    delta.file.save("delta.tar", SimpleUploadedFile("delta.tar", b"d" * 10), save=False)
    delta.save()
    args = apply_kwargs(make_job(n1, fleet.node_a), {})
    assert "parts_url" not in args and "full_artifact_url" in args


def test_parts_of_a_deleted_release_are_collected(
    published: tuple[Release, Release], releases: Releases, settings: Settings,
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:  # fmt: skip
    n, n1 = published
    parts.release_parts_extract(release_id=n.pk)
    parts.release_parts_extract(release_id=n1.pk)
    root = Path(settings.MEDIA_ROOT) / "parts"
    with django_capture_on_commit_callbacks(execute=True):
        release_delete(release=n1, user=None)
    assert parts.release_parts_gc() > 0
    objects = {p.name for p in (root / "objects").glob("*/*")}
    assert objects == {sha(d) for d in releases.files_n.values()}  # N's, shared ones included
    assert [p.name for p in (root / "releases").iterdir()] == [n.sha256]


@pytest.mark.django_db(transaction=True)
def test_a_node_on_n_fetches_n1_by_parts_through_the_dashboard(
    live_server: LiveServer,
    settings: Settings,
    published: tuple[Release, Release],
    releases: Releases,
    fleet: Fleet,
    make_job: MakeJob,
    node: Node,
) -> None:
    settings.THEMIS_PUBLIC_URL = live_server.url
    _, n1 = published
    parts.release_parts_extract(release_id=n1.pk)
    job = make_job(n1, fleet.node_a)
    args = apply_kwargs(job, {})
    node.install(releases.n)
    asked: list[tuple[str, int]] = []

    def session() -> requests.Session:
        made = requests.Session()
        made.hooks["response"].append(
            lambda response, **_kw: asked.append((response.url, response.status_code))
        )
        return made

    result = fetch_by_parts(
        args["parts_url"],
        token=args["download_token"],
        state_dir=node.state,
        target=node.target,
        trust_anchor=node.pki.root,
        session_factory=session,
    )
    names = [url.rsplit("/", 1)[1] for url, status in asked if status in (200, 206)]
    assert names[:2] == ["manifest.json", "manifest.json.p7s"]
    assert sorted(names[2:]) == sorted(sha(releases.files_n1[p]) for p in CHANGED)
    assert len(asked) == len(names)  # nothing refused, nothing retried
    engine.apply_bundle(
        result.staged.bundle, target=node.target, state_dir=node.state, trust_anchor=node.pki.root
    )
    assert tree(node.target) == releases.files_n1
    full = sum(len(d) for d in releases.files_n1.values())
    assert result.bytes_fetched < full / 2
