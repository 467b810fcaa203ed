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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core import signing
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import reverse

from .models import ArtifactTombstone, Release, ReleaseFile, Rollout, UpdateJob
from .services import event_log

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


class ReleaseInUse(Exception):
    """The release is referenced by jobs or rollouts and so cannot be deleted."""


@transaction.atomic
def release_deprecate(*, release: Release, user: Any) -> bool:
    """Mark a release deprecated: no new updates or rollouts may use it. Returns
    False (and logs nothing) when it already was."""
    changed = Release.objects.filter(pk=release.pk, state=Release.State.PUBLISHED).update(
        state=Release.State.DEPRECATED
    )
    release.refresh_from_db(fields=["state"])
    if changed:
        event_log(
            verb="release.deprecated",
            actor=user,
            obj=release,
            details={"product": release.product, "version": release.version},
        )
    return bool(changed)


def release_delete(*, release: Release, user: Any) -> list[str]:
    """Delete a release and, once that has committed, its files (the artifact
    and every ReleaseFile). Returns the storage names removed.

    Refused with ReleaseInUse while any job or rollout references the release,
    finished ones included: they are its history (deprecate it instead)."""
    try:
        with transaction.atomic():
            names = _delete_row(release, user)
    except (ProtectedError, IntegrityError) as err:
        # A job or rollout was created for it between our check and the delete.
        raise ReleaseInUse(f"release {release.version} is in use: {err}") from err
    return names


def _delete_row(release: Release, user: Any) -> list[str]:
    locked = Release.objects.select_for_update().filter(pk=release.pk).first()
    if locked is None:
        return []  # already deleted (a double submit): nothing to do
    _refuse_if_referenced(locked)
    names = stored_names(locked)
    ArtifactTombstone.objects.bulk_create([ArtifactTombstone(path=name) for name in names])
    event_log(
        verb="release.deleted",
        actor=user,
        obj=locked,
        details={"product": locked.product, "version": locked.version, "files": names},
    )
    locked.delete()
    # Files go only after the row is gone for good; a crash in between leaves
    # tombstones that artifact_tombstones_cleanup() finishes.
    transaction.on_commit(lambda: _reap(names), robust=True)
    return names


def _refuse_if_referenced(release: Release) -> None:
    jobs = UpdateJob.objects.filter(release=release).count()
    rollouts = Rollout.objects.filter(release=release).count()
    if jobs or rollouts:
        raise ReleaseInUse(
            f"release {release.version} is referenced by {jobs} update job(s) and "
            f"{rollouts} rollout(s); releases with history are kept, deprecate it instead"
        )


def stored_names(release: Release) -> list[str]:
    """Storage names (relative to MEDIA_ROOT) of every file a release holds."""
    names = [str(release.artifact.name)] if release.artifact else []
    extra = ReleaseFile.objects.filter(release=release).values_list("file", flat=True)
    names += [str(name) for name in extra if name]
    return list(dict.fromkeys(names))


def artifact_tombstones_cleanup() -> int:
    """Remove files whose release row is gone, then their tombstones. Safe to
    run any time and repeatedly; returns how many tombstones it cleared."""
    names = list(ArtifactTombstone.objects.values_list("path", flat=True).distinct())
    return _reap(names)


def _reap(names: Iterable[str]) -> int:
    done = [name for name in names if _remove(name)]
    deleted, _ = ArtifactTombstone.objects.filter(path__in=done).delete()
    return deleted


def _remove(name: str) -> bool:
    """Unlink one stored file; True when its tombstone can go."""
    path = media_path(name)
    if path is None:
        log.warning("tombstone %r points outside MEDIA_ROOT: dropped, nothing unlinked", name)
        return True
    if _still_referenced(name):
        # Storage reuses free names: a new release may own this path now.
        log.warning("tombstone %r: the path belongs to a live release again; kept its file", name)
        return True
    if path.is_dir() and not path.is_symlink():
        log.warning("tombstone %r is a directory: dropped, nothing unlinked", name)
        return True
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.exception("could not remove artifact %s; the beat task will retry", path)
        return False
    return True


def media_path(name: str) -> Path | None:
    """MEDIA_ROOT/name if that lies inside MEDIA_ROOT (its directory resolved,
    so `..` or a symlinked directory cannot lead out); None otherwise."""
    if not name or "\x00" in name:
        return None
    root = Path(settings.MEDIA_ROOT).resolve()
    candidate = root / name
    if candidate.name in {"", ".", ".."}:
        return None
    parent = candidate.parent.resolve()
    if not parent.is_relative_to(root):
        return None
    return parent / candidate.name


def _still_referenced(name: str) -> bool:
    return (
        Release.objects.filter(artifact=name).exists()
        or ReleaseFile.objects.filter(file=name).exists()
    )
