"""The agent's download against the real dashboard view, over real HTTP."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests
from pytest_django import Settings
from pytest_django.live_server_helper import LiveServer

from tests.conftest import Fleet
from tests.releases.conftest import MakeJob, MakeRelease, payload
from updates.models import UpdateJob
from updates.releases.artifacts import artifact_url, job_download_token
from workers.download import DownloadRefused, download_resumable

pytestmark = pytest.mark.django_db(transaction=True)

CONTENT = payload(2 * 1024 * 1024 + 77)
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"  # tmp_path also holds this test's MEDIA_ROOT
    path.mkdir()
    return path


@pytest.fixture
def job(fleet: Fleet, make_release: MakeRelease, make_job: MakeJob) -> UpdateJob:
    return make_job(make_release(content=CONTENT), fleet.node_a)


def _recording_session() -> tuple[requests.Session, list[requests.Response]]:
    session, seen = requests.Session(), []
    session.hooks["response"].append(lambda response, **_kw: seen.append(response))
    return session, seen


def test_resumes_a_partial_file_from_the_view(
    live_server: LiveServer, settings: Settings, job: UpdateJob, downloads: Path
) -> None:
    settings.THEMIS_PUBLIC_URL = live_server.url
    dest = downloads / "bundle.tar"
    half = len(CONTENT) // 2
    dest.with_suffix(".tar.part").write_bytes(CONTENT[:half])  # left by an earlier attempt
    session, seen = _recording_session()
    download_resumable(
        artifact_url(job),
        job_download_token(job),
        dest,
        sha256=SHA,
        size=len(CONTENT),
        session=session,
    )
    assert dest.read_bytes() == CONTENT
    assert sorted(p.name for p in downloads.iterdir()) == ["bundle.tar"]
    assert [r.status_code for r in seen] == [206]
    assert seen[0].request.headers["Range"] == f"bytes={half}-"
    assert seen[0].headers["Content-Range"] == f"bytes {half}-{len(CONTENT) - 1}/{len(CONTENT)}"


def test_full_download_from_the_view(
    live_server: LiveServer, settings: Settings, job: UpdateJob, downloads: Path
) -> None:
    settings.THEMIS_PUBLIC_URL = live_server.url
    session, seen = _recording_session()
    dest = download_resumable(
        artifact_url(job), job_download_token(job), downloads / "b.tar", sha256=SHA, session=session
    )
    assert dest.read_bytes() == CONTENT
    assert [r.status_code for r in seen] == [200]


def test_refusals_from_the_view(
    live_server: LiveServer,
    settings: Settings,
    job: UpdateJob,
    fleet: Fleet,
    make_job: MakeJob,
    downloads: Path,
) -> None:
    settings.THEMIS_PUBLIC_URL = live_server.url
    other = make_job(job.release, fleet.node_b)
    with pytest.raises(DownloadRefused, match="HTTP 403"):
        download_resumable(
            artifact_url(job), job_download_token(other), downloads / "b", sha256=SHA
        )
    UpdateJob.objects.filter(pk=job.pk).update(state=UpdateJob.State.DONE)
    with pytest.raises(DownloadRefused, match="HTTP 410"):
        download_resumable(artifact_url(job), job_download_token(job), downloads / "b", sha256=SHA)
    assert list(downloads.iterdir()) == []
