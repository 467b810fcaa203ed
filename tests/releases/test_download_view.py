"""GET /artifacts/jobs/<id>/bundle: per-job bearer token, Range semantics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from unittest import mock

import pytest
from django.core import signing
from django.test import Client
from django.urls import reverse
from pytest_django import Settings

from tests.conftest import Fleet
from tests.releases.conftest import MakeJob, MakeRelease, payload, streamed_body
from updates.models import UpdateJob
from updates.releases.artifacts import artifact_url, job_download_token

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse

pytestmark = pytest.mark.django_db

SIZE = 300_000
CONTENT = payload(SIZE)


@pytest.fixture
def job(fleet: Fleet, make_release: MakeRelease, make_job: MakeJob) -> UpdateJob:
    return make_job(make_release(content=CONTENT), fleet.node_a)


def _get(
    job_or_id: UpdateJob | int,
    token: str | None = None,
    client: Client | None = None,
    /,  # so a `**{"If-Range": ...}` header can never be taken for the client
    **headers: str,
) -> tuple[_MonkeyPatchedWSGIResponse, bytes]:
    job_id = job_or_id if isinstance(job_or_id, int) else job_or_id.pk
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = reverse("artifact_job_bundle", kwargs={"job_id": job_id})
    response = (client or Client()).get(url, headers=headers)
    # Consuming the stream lets the test client close the response (and the file).
    body = streamed_body(response) if response.streaming else response.content
    return response, body


def test_full_download_with_headers(job: UpdateJob) -> None:
    response, body = _get(job, job_download_token(job))
    assert response.status_code == 200
    assert body == CONTENT
    assert response["Content-Length"] == str(SIZE)
    assert response["Accept-Ranges"] == "bytes"
    assert job.release is not None  # narrows: the fixture's job has a release
    assert response["ETag"] == f'"{job.release.sha256}"'
    assert response["Content-Type"] == "application/octet-stream"
    assert "no-store" in response["Cache-Control"]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-", 1000, SIZE - 1),
        ("bytes=-500", SIZE - 500, SIZE - 1),
        ("bytes=299990-999999", 299_990, SIZE - 1),  # end past the file: clamped
        ("bytes=-999999", 0, SIZE - 1),  # suffix longer than the file: all of it
        ("bytes=5-5", 5, 5),
    ],
)
def test_range_is_served_as_206(job: UpdateJob, header: str, start: int, end: int) -> None:
    response, body = _get(job, job_download_token(job), Range=header)
    assert response.status_code == 206
    assert body == CONTENT[start : end + 1]
    assert response["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert response["Content-Length"] == str(end - start + 1)
    assert response["Accept-Ranges"] == "bytes"


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
def test_unsatisfiable_range_is_416(job: UpdateJob, header: str) -> None:
    response, body = _get(job, job_download_token(job), Range=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{SIZE}"
    assert body == b""


@pytest.mark.parametrize(
    "header", ["items=0-9", "bytes=9-0", "bytes=0-1,5-6", "bytes=abc", "bytes=-", "bytes=1" * 30]
)
def test_ignored_range_headers_get_the_whole_file(job: UpdateJob, header: str) -> None:
    response, body = _get(job, job_download_token(job), Range=header)
    assert response.status_code == 200
    assert body == CONTENT


def test_if_range_resumes_only_the_same_file(job: UpdateJob) -> None:
    token = job_download_token(job)
    assert job.release is not None  # narrows: the fixture's job has a release
    same, body = _get(job, token, Range="bytes=10-", **{"If-Range": f'"{job.release.sha256}"'})
    assert same.status_code == 206
    assert body == CONTENT[10:]
    changed, body = _get(job, token, Range="bytes=10-", **{"If-Range": '"' + "0" * 64 + '"'})
    assert changed.status_code == 200
    assert body == CONTENT


def test_no_token_is_403_even_with_a_session(job: UpdateJob, personas: dict[str, Client]) -> None:
    for client in (personas["anonymous"], personas["operator"]):
        response, _ = _get(job, None, client)
        assert response.status_code == 403  # not a login redirect: nodes have no session


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer not-a-token", "Basic b2xpdmlhOnB3", "Token {token}", "{token}"],
)
def test_malformed_or_wrong_scheme_is_403(job: UpdateJob, authorization: str) -> None:
    header = authorization.format(token=job_download_token(job))
    response, _ = _get(job, Authorization=header)
    assert response.status_code == 403


def test_query_token_is_not_accepted(job: UpdateJob) -> None:
    url = reverse("artifact_job_bundle", kwargs={"job_id": job.pk})
    response = Client().get(url, {"token": job_download_token(job)})
    assert response.status_code == 403


def test_token_of_another_job_is_403(
    job: UpdateJob, fleet: Fleet, make_release: MakeRelease, make_job: MakeJob
) -> None:
    other = make_job(make_release("1.8.0"), fleet.node_b)
    response, body = _get(job, job_download_token(other))
    assert response.status_code == 403
    assert b"another job" in body
    assert CONTENT[:100] not in body


def test_signature_with_another_salt_is_403(job: UpdateJob) -> None:
    forged = signing.TimestampSigner().sign(str(job.pk))  # same SECRET_KEY, no salt
    response, _ = _get(job, forged)
    assert response.status_code == 403


def test_expired_token_is_403(job: UpdateJob, settings: Settings) -> None:
    settings.THEMIS_DOWNLOAD_TOKEN_SECONDS = 600
    issued = time.time() - 601
    with mock.patch("django.core.signing.time.time", return_value=issued):
        token = job_download_token(job)
    response, body = _get(job, token)
    assert response.status_code == 403
    assert b"expired" in body


def test_unknown_job_is_404_with_a_valid_token(job: UpdateJob) -> None:
    token = job_download_token(job)
    job_id = job.pk
    job.delete()
    response, _ = _get(job_id, token)
    assert response.status_code == 404


def test_rollback_job_has_no_bundle_404(fleet: Fleet, make_job: MakeJob) -> None:
    rollback = make_job(None, fleet.node_a)
    response, _ = _get(rollback, job_download_token(rollback))
    assert response.status_code == 404


@pytest.mark.parametrize("state", UpdateJob.FINAL_STATES)
def test_finished_job_is_410(job: UpdateJob, state: str) -> None:
    token = job_download_token(job)
    UpdateJob.objects.filter(pk=job.pk).update(state=state)
    response, body = _get(job, token)
    assert response.status_code == 410
    assert CONTENT[:100] not in body


def test_missing_file_is_404(job: UpdateJob) -> None:
    token = job_download_token(job)
    assert job.release is not None  # narrows: the fixture's job has a release
    job.release.artifact.delete(save=False)
    response, _ = _get(job, token)
    assert response.status_code == 404


def test_only_get(job: UpdateJob) -> None:
    url = reverse("artifact_job_bundle", kwargs={"job_id": job.pk})
    auth = {"Authorization": f"Bearer {job_download_token(job)}"}
    assert Client().post(url, headers=auth).status_code == 405


def test_artifact_url_uses_the_public_url(job: UpdateJob, settings: Settings) -> None:
    settings.THEMIS_PUBLIC_URL = "https://themis.example.net/"
    assert artifact_url(job) == f"https://themis.example.net/artifacts/jobs/{job.pk}/bundle"
