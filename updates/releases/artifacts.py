"""Release artifacts: how nodes fetch them and how they leave storage.

Nodes download a job's bundle over HTTP with a short-lived token bound to that
one job, and resume interrupted downloads with `Range`. Deleting a release
removes its files only after the row is gone (on commit); a tombstone written
in the same transaction lets the beat task finish the job after a crash.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core import signing
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import reverse

from updates.models import Release, ReleaseFile, UpdateJob

log = logging.getLogger(__name__)

TOKEN_SALT = "updates.artifacts.job-bundle"  # noqa: S105 - a namespace, not a secret
CHUNK_BYTES = 256 << 10


# --- download tokens -------------------------------------------------------


class DownloadRefused(Exception):
    """A download the view must refuse, with the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _signer() -> signing.TimestampSigner:
    # The salt keeps signatures made elsewhere with SECRET_KEY from being replayed here.
    return signing.TimestampSigner(salt=TOKEN_SALT)


def job_download_token(job: UpdateJob) -> str:
    """A token that lets whoever holds it download this job's bundle, for
    THEMIS_DOWNLOAD_TOKEN_SECONDS from now. Make it when the job is sent."""
    return _signer().sign(str(job.pk))


DELTA_PREFIX = "delta-"


def delta_variant(base_version: str) -> str:
    """The URL variant naming the job release's delta bundle from `base_version`."""
    return f"{DELTA_PREFIX}{base_version}"


def artifact_url(job: UpdateJob, *, variant: str | None = None) -> str:
    """Where the node fetches the bundle of `job` (send the token as a Bearer
    header): the full bundle, or with `variant` one of its delta bundles."""
    if variant is None:
        path = reverse("artifact_job_bundle", kwargs={"job_id": job.pk})
    else:
        path = reverse("artifact_job_bundle_variant", kwargs={"job_id": job.pk, "variant": variant})
    return f"{settings.THEMIS_PUBLIC_URL.rstrip('/')}{path}"


def plan_artifact_url(job: UpdateJob, release_id: int) -> str:
    """Where the node fetches the bundle of one step of `job`'s plan (the same token)."""
    if release_id == job.release_id:
        return artifact_url(job)
    path = reverse("artifact_job_plan_bundle", kwargs={"job_id": job.pk, "release_id": release_id})
    return f"{settings.THEMIS_PUBLIC_URL.rstrip('/')}{path}"


def job_plan_release(job: UpdateJob, release_id: int) -> Release:
    """The release of one step of the job's plan, for a download `job_for_download`
    allowed. A release the plan does not name is refused, whatever the token: a job's
    token opens its own bundles only."""
    if release_id not in job.plan_release_ids:
        raise DownloadRefused(403, f"release {release_id} is not in job {job.pk}'s plan")
    release = Release.objects.filter(pk=release_id).first()
    if release is None or not release.artifact:
        raise DownloadRefused(404, f"release {release_id} has no bundle to download")
    return release


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or ""."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def job_for_download(*, job_id: int, token: str) -> UpdateJob:
    """The job whose bundle `token` may fetch. The token is checked before the
    database is asked, so nobody learns which job ids exist without one."""
    if not token:
        raise DownloadRefused(403, "a download token is required (Authorization: Bearer)")
    try:
        signed_id = _signer().unsign(token, max_age=settings.THEMIS_DOWNLOAD_TOKEN_SECONDS)
    except signing.SignatureExpired:
        raise DownloadRefused(403, "download token expired") from None
    except signing.BadSignature:
        raise DownloadRefused(403, "invalid download token") from None
    if signed_id != str(job_id):
        raise DownloadRefused(403, "download token belongs to another job")
    job: UpdateJob | None = UpdateJob.objects.select_related("release").filter(pk=job_id).first()
    if job is None:
        raise DownloadRefused(404, f"no job {job_id}")
    if job.release is None or not job.release.artifact:
        raise DownloadRefused(404, f"job {job_id} has no bundle to download")
    if not job.is_active:
        # 410, not 403: the token is fine, the job is over; the agent must not retry.
        raise DownloadRefused(410, f"job {job_id} is {job.state}: its download is closed")
    return job


# --- Range serving -----------------------------------------------------------


class RangeNotSatisfiable(Exception):
    """A well-formed Range that lies wholly outside the file: answered with 416."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1


# One range only; 19 digits bound the numbers (int() of a huge string is slow).
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a `Range` header asks for, or None to send the
    whole file: no header, another unit, several ranges or bad syntax are all
    ignored, as RFC 9110 allows. Raises RangeNotSatisfiable for a well-formed
    range that lies outside the file."""
    match = _RANGE.fullmatch((header or "").replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # "-n": the last n bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable
    return ByteRange(start, min(end, size - 1))


class _FileSlice:
    """Iterates over `length` bytes of an open file from `start`. Django calls
    close() when the response ends, whether it was iterated or not."""

    def __init__(self, fh: IO[bytes], start: int, length: int) -> None:
        self.fh, self.start, self.length = fh, start, length

    def __iter__(self) -> Iterator[bytes]:
        self.fh.seek(self.start)
        remaining = self.length
        while remaining > 0:
            data = self.fh.read(min(CHUNK_BYTES, remaining))
            if not data:
                return  # the file shrank: the client sees a short body and resumes
            remaining -= len(data)
            yield data

    def close(self) -> None:
        self.fh.close()


def artifact_response(
    path: Path, *, sha256: str, range_header: str | None, if_range: str | None
) -> HttpResponseBase:
    """Serve `path` whole (200), one byte range of it (206) or 416."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the response (_FileSlice.close)
    except FileNotFoundError:
        log.error("artifact %s is missing from storage", path)
        return HttpResponse(
            "artifact missing from storage\n", status=404, content_type="text/plain"
        )
    size = os.fstat(fh.fileno()).st_size
    etag = f'"{sha256}"' if sha256 else ""
    try:
        # If-Range: resume only if the file is still the one the client began with.
        wanted = parse_range(range_header, size) if _if_range_ok(if_range, etag) else None
    except RangeNotSatisfiable:
        fh.close()
        unsatisfiable = HttpResponse(status=416)
        unsatisfiable["Content-Range"] = f"bytes */{size}"
        return _common_headers(unsatisfiable, etag)
    return _common_headers(_stream(fh, path.name, size, wanted), etag)


def _stream(fh: IO[bytes], name: str, size: int, wanted: ByteRange | None) -> HttpResponseBase:
    span = wanted or ByteRange(0, size - 1)
    response = StreamingHttpResponse(
        _FileSlice(fh, span.start, span.length),
        status=206 if wanted else 200,
        content_type="application/octet-stream",
    )
    response["Content-Length"] = str(span.length)
    if wanted:
        response["Content-Range"] = f"bytes {span.start}-{span.end}/{size}"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


def _if_range_ok(if_range: str | None, etag: str) -> bool:
    return if_range is None or (bool(etag) and if_range.strip() == etag)


def _common_headers(response: HttpResponseBase, etag: str) -> HttpResponseBase:
    response["Accept-Ranges"] = "bytes"
    if etag:
        response["ETag"] = etag
    # Token-protected: no shared cache may keep a copy.
    response["Cache-Control"] = "private, no-store"
    return response


def job_artifact_response(
    job: UpdateJob,
    *,
    range_header: str | None,
    if_range: str | None,
    variant: str | None = None,
) -> HttpResponseBase:
    """Serve the job's full bundle, or (variant `delta-<base>`) its delta
    bundle from that base version; the job's token covers both."""
    release = job.release
    assert release is not None  # job_for_download guarantees it
    if variant is None:
        return artifact_response(
            Path(release.artifact.path),
            sha256=release.sha256,
            range_header=range_header,
            if_range=if_range,
        )
    delta = None
    if variant.startswith(DELTA_PREFIX):
        delta = (
            ReleaseFile.objects.filter(
                release=release,
                kind=ReleaseFile.Kind.DELTA,
                base_version=variant.removeprefix(DELTA_PREFIX),
            )
            .exclude(file="")
            .order_by("-pk")
            .first()
        )
    if delta is None:
        return HttpResponse(
            f"job {job.pk} has no bundle {variant!r}\n", status=404, content_type="text/plain"
        )
    return artifact_response(
        Path(delta.file.path), sha256=delta.sha256, range_header=range_header, if_range=if_range
    )


# --- deprecate and delete ----------------------------------------------------
